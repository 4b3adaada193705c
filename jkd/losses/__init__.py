"""jkd.losses: pure, documented loss functions for distillation and preference optimisation.

Conventions: keyword-only options; float32 compute for any input dtype; token-level losses return
unreduced values of shape ``logits.shape[:-1]``, zero where ``where`` is False; reduction is an
explicit, separate step (:func:`masked_mean`, :func:`sequence_sum`, :func:`sequence_mean`).
"""

from jkd.losses.divergences import (
    CORES,
    DIVERGENCES,
    adaptive_kl,
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
    LossTerm,
    Objective,
    build_objective,
    register_loss_term,
    token_mask,
)
