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
from jkd.models.hf import load_hf, params_from_state_dict, params_to_state_dict, save_hf
from jkd.models.student import layers_every, student_from_teacher
from jkd.models.gguf_io import (
    SUPPORTED_QUANT_TYPES,
    check_vocab,
    load_gguf,
    load_tokenizer,
    read_gguf_tensors,
    smollm2_gguf_path,
)
