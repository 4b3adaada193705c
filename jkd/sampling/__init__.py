"""jkd.sampling: KV-cached generation (greedy, temperature, top-k, top-p, min-p) from jkd models."""

from jkd.sampling.sampler import (
    MIN_LENGTH_BUCKET,
    NUCLEUS_CANDIDATES,
    SampleOutput,
    batch_bucket,
    check_filters,
    compile_count,
    filter_logits,
    generate,
    length_bucket,
    prompt_rows,
)
