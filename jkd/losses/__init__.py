"""jkd.losses: pure, documented loss functions for distillation and preference optimisation.

Conventions: keyword-only options; float32 compute for any input dtype; token-level losses return
unreduced values of shape ``logits.shape[:-1]``, zero where ``where`` is False; reduction is an
explicit, separate step (:func:`masked_mean`, :func:`sequence_sum`, :func:`sequence_mean`).
"""

from jkd.losses.divergences import (
    CORES,
    DIVERGENCES,
    adaptive_kl,
    balanced_kl,
    forward_kl,
    full_divergence,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    taid_kl,
    total_variation,
)
from jkd.losses.features import (
    attention_transfer_loss,
    hidden_state_loss,
    init_projection,
    layer_map_hidden_loss,
    norm_direction_loss,
    sinkhorn_loss,
    sinkhorn_plan,
    token_relation_loss,
    uniform_layer_map,
)
from jkd.losses.fused import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_VOCAB_BLOCK,
    blocked_linear_loss,
    chunked_linear_loss,
    fused_linear_cross_entropy,
    fused_linear_divergence,
    fused_linear_sparse_divergence,
)
from jkd.losses.sparse import sparse_bins, sparse_divergence
from jkd.losses.taid import TAIDState, taid_init, taid_update
from jkd.losses.tokens import (
    IGNORE_INDEX,
    cross_entropy,
    label_mask,
    masked_mean,
    sequence_mean,
    sequence_sum,
    token_logprobs,
)
from jkd.losses.objective import (
    LOSS_TERMS,
    STATE_INPUTS,
    LossTerm,
    Objective,
    build_objective,
    register_loss_term,
    token_mask,
)
from jkd.losses.sequences import SequenceLogprobs, fused_sequence_logprobs, sequence_logprobs
from jkd.losses.dpo import (
    PREFERENCE_LOSSES,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    kto_kl_estimate,
    kto_loss,
    nca_pair_loss,
    preference_loss,
    preference_metrics,
    robust_dpo_loss,
    sft_loss,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from jkd.losses.reference_free import (
    cpo_loss,
    orpo_log_odds_ratio,
    orpo_loss,
    redi_loss,
    simpo_loss,
)
from jkd.losses.aligned_teacher import SparseTeacher, adpa_advantage_loss, dckd_loss
from jkd.losses.listwise import (
    best_and_worst,
    lambda_weights,
    ranking_metrics,
    reward_ranks,
    tpo_loss,
)
from jkd.losses import preference_objective as _terms  # noqa: F401  (registers terms)
from jkd.losses.qcrd import qcrd_loss, quality_from_logps  # (registers the 'qcrd' term)
from jkd.losses.uld import align_by_offsets, gather_aligned_logits, uld_loss
from jkd.losses.contrastive import (  # (registers the 'crd' term)
    CRDBank,
    crd_bank_init,
    crd_bank_push,
    crd_loss,
    crd_pool,
    crd_project,
    init_crd_projection,
)
from jkd.losses.dual_head import (  # (registers the 'dual_head' term)
    aux_head,
    dual_head_logprobs,
    export_params,
    merged_head,
)
