"""jkd.models: Flax decoders, Hugging Face / GGUF import and export, tokenizers."""

from jkd.models.config import ARCHITECTURES, ModelConfig
from jkd.models.transformer import (
    ModelOutput,
    apply,
    init_cache,
    init_params,
    output_head,
    param_axes,
    rope_frequencies,
)
