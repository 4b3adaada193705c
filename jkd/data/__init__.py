"""jkd.data: datasets on disk (TFDS ArrayRecord), pipelines, teacher-written corpora and caches.

The modules with a command line (``jsonl``, ``corpus``, ``teacher_cache``, ``preference``) are
imported on first use of one of their names, so ``python -m jkd.data.<module>`` runs cleanly.
"""

from jkd._lazy import lazy_exports

from jkd.data.store import (
    open_split,
    read_metadata,
    scalar_feature,
    tensor_feature,
    text_feature,
    write_dataset,
)
from jkd.data.examples import (
    IGNORE_INDEX,
    OVERFLOW,
    finish_example,
    pack_examples,
    pad_example,
    tokenize_example,
)
from jkd.data.source import BatchSource, as_batch_source
from jkd.data.arrays import ArraySource, synthetic_lm_examples, synthetic_pair_examples
from jkd.data.pipeline import (
    DataPipeline,
    text_pipeline,
    text_transform,
    tokenized_transform,
)
from jkd.data.scoring import SCORERS, Candidate, make_scorer, register_scorer
from jkd.data.tokenizers import (
    PROBE_TEXTS,
    TokenizerMatch,
    check_same_tokenizer,
    compare_tokenizers,
    cross_tokenize,
    cross_tokenize_batch,
)
from jkd.data.selection import (
    DomainMixture,
    DomainWeights,
    MiniPLMSelection,
    difference_scores,
    document_logprob_means,
    mean_token_nll,
    miniplm_select,
    select_top_fraction,
)

#: Public names of the command-line modules, imported when first used.
_LAZY = {
    "SHAPES": "jsonl",
    "build_jsonl_dataset": "jsonl",
    "detect_shape": "jsonl",
    "generate_corpus": "corpus",
    "read_prompts": "corpus",
    "TAIL_FLOOR": "teacher_cache",
    "check_cache": "teacher_cache",
    "char_tokenizer": "model_spec",
    "load_model": "model_spec",
    "model_config": "model_spec",
    "LoadedModel": "model_spec",
    "teacher_fingerprint": "teacher_cache",
    "topk_logprobs": "teacher_cache",
    "write_teacher_cache": "teacher_cache",
    "fit_cache_temperature": "teacher_cache",
    "TemperatureFit": "calibration",
    "fit_temperature": "calibration",
    "renormalize_topk": "calibration",
    "topk_ece": "calibration",
    "topk_nll": "calibration",
    "PrivacySpec": "privacy",
    "analytic_gaussian_delta": "privacy",
    "analytic_gaussian_epsilon": "privacy",
    "analytic_gaussian_sigma": "privacy",
    "gaussian_sigma": "privacy",
    "private_topk": "privacy",
    "Pairs": "preference",
    "make_pairs": "preference",
    "read_pairs": "preference",
    "reference_fingerprint": "preference",
    "reference_logprobs": "preference",
    "tokenize_pairs": "preference",
    "tokenize_preference": "preference",
    "write_pairs": "preference",
    "DraftPairs": "arte",
    "lookahead_gains": "arte",
    "rank_drafts": "arte",
    "student_gains": "arte",
    "CRITICS": "critics",
    "filter_candidates": "critics",
    "generate_and_filter": "critics",
    "keep_mask": "critics",
    "make_critic": "critics",
    "register_critic": "critics",
    "self_consistent": "critics",
    "check_ranking": "ranked",
    "read_ranked_jsonl": "ranked",
    "read_step_pairs_jsonl": "ranked",
    "synthetic_ranked_examples": "ranked",
    "tokenize_ranked": "ranked",
    "tokenize_ranked_lists": "ranked",
    "tokenize_step_pair": "ranked",
    "tokenize_step_pairs": "ranked",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
