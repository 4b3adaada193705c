"""Hugging Face checkpoints: tiny Llama/Qwen2/Qwen3 logits against transformers' goldens, export
round trips, config.json round trips and bad inputs.

The goldens (tests/data/tiny_*/golden.npz) come from scripts/make_goldens.py (PyTorch +
transformers); these tests need neither.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.models import hf, transformer
from jkd.models.config import ModelConfig
from jkd.models.gguf_io import load_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
ARCHS = ("llama", "qwen2", "qwen3")

def _tiny(arch: str) -> str:
  return os.path.join(DATA, f"tiny_{arch}")


def _golden(arch: str):
  return dict(np.load(os.path.join(_tiny(arch), "golden.npz")))


@functools.partial(jax.jit, static_argnames="config")
def _jit_logits(params, tokens, attention_mask, positions, config):
  return transformer.apply(params, tokens, config=config, attention_mask=attention_mask,
                           positions=positions).logits


def _logits(params, config, golden, *, jit=True):
  """Logits on the golden batch: jitted with the golden positions, or eager with the default
  positions (the count of real tokens before each one)."""
  tokens, mask = jnp.asarray(golden["tokens"]), jnp.asarray(golden["attention_mask"])
  if jit:
    return np.asarray(_jit_logits(params, tokens, mask, jnp.asarray(golden["positions"]),
                                  config=config))
  return np.asarray(transformer.apply(params, tokens, config=config, attention_mask=mask).logits)


def _same_model(a: ModelConfig, b: ModelConfig) -> bool:
  """Equal configs, where head_dim=None and the explicit hidden // heads are the same."""
  return a.dim_per_head == b.dim_per_head and a.replace(head_dim=None) == b.replace(head_dim=None)


def _max_diff(logits, golden) -> float:
  valid = golden["attention_mask"].astype(bool)
  return float(np.abs(logits - golden["logits"])[valid].max())


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_logits_match_transformers(arch):
  config, params = hf.load_hf(_tiny(arch))
  golden = _golden(arch)
  assert _max_diff(_logits(params, config, golden, jit=True), golden) <= 1e-3
  assert _max_diff(_logits(params, config, golden, jit=False), golden) <= 1e-3


def test_tiny_configs_carry_each_architecture_trait():
  llama, _ = hf.load_hf(_tiny("llama"))
  assert (llama.rope_scaling, llama.tie_embeddings, llama.qkv_bias) == ((4.0, 1.0, 4.0, 16),
                                                                         False, False)
  qwen2, params = hf.load_hf(_tiny("qwen2"))
  assert (qwen2.qkv_bias, qwen2.tie_embeddings, qwen2.num_layers) == (True, True, 3)
  assert "lm_head" not in params and np.abs(params["layers"]["attn"]["q"]["bias"]).max() > 0
  qwen3, params = hf.load_hf(_tiny("qwen3"))
  assert (qwen3.qk_norm, qwen3.dim_per_head, qwen3.hidden_size // qwen3.num_heads) == (True, 32,
                                                                                       16)
  assert params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 4, 32)


@pytest.mark.parametrize("shard", [None, 100_000], ids=["single", "sharded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2",
                                  "qwen3"])
def test_export_round_trip(arch, shard, tmp_path):
  config, params = hf.load_hf(_tiny(arch))
  out = str(tmp_path / "export")
  hf.save_hf(out, params, config, max_shard_bytes=shard)
  files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
  if shard is None:
    assert files == ["model.safetensors"]
  else:
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
      index = json.load(f)
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == sorted(files)
  config2, params2 = hf.load_hf(out)
  assert _same_model(config2, config)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  golden = _golden(arch)
  np.testing.assert_array_equal(_logits(params2, config, golden), _logits(params, config, golden))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_json_round_trip(arch, tmp_path):
  config, _ = hf.load_hf(_tiny(arch))
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config.to_hf()))
  assert _same_model(ModelConfig.from_hf(json.loads(path.read_text())), config)
  with open(os.path.join(_tiny(arch), "config.json")) as f:
    original = json.load(f)
  exported = config.to_hf()
  for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"):
    assert exported[key] == original[key], key
  assert exported["head_dim"] == original.get("head_dim", 64 // original["num_attention_heads"])


def _copy(arch: str, tmp_path) -> str:
  out = str(tmp_path / f"tiny_{arch}")
  shutil.copytree(_tiny(arch), out)
  return out


def test_unsupported_architecture_is_a_clear_error(tmp_path):
  out = _copy("llama", tmp_path)
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  cfg["model_type"] = "gpt2"
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama"):
    hf.load_hf(out)


def test_checkpoint_shapes_must_match_the_config():
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\)"
                                       r" in the checkpoint but \(80, 64\) in the config"):
    hf.load_hf(_tiny("llama"), intermediate_size=80)
  with pytest.raises(ValueError, match="no tensor 'model.layers.2.self_attn.q_proj.weight'"):
    hf.load_hf(_tiny("llama"), num_layers=3)


def test_missing_tensor_is_a_clear_error(tmp_path):
  from safetensors.numpy import load_file, save_file
  out = _copy("qwen2", tmp_path)
  path = os.path.join(out, "model.safetensors")
  state = load_file(path)
  del state["model.layers.1.self_attn.k_proj.bias"]
  save_file(state, path)
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.self_attn.k_proj.bias'"):
    hf.load_hf(out)


def test_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.load_hf(str(tmp_path))
  out = _copy("qwen3", tmp_path)
  os.remove(os.path.join(out, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf.load_hf(out)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
    load_tokenizer(_tiny("qwen3"))
  with pytest.raises(FileNotFoundError, match="no tokenizer source"):
    load_tokenizer(str(tmp_path / "nowhere"))
