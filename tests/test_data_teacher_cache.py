"""Offline teacher cache: cached top-k == the online teacher's (float64 NumPy reference)."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses, models
from jkd.data import open_split, read_metadata
from jkd.data import model_spec
from jkd.data import teacher_cache as tc

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2)


@pytest.fixture(scope="module")
def tiny():
  config = models.ModelConfig(**TINY)
  return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(3))


def _examples(rng, n, t, vocab):
  return {"tokens": rng.integers(0, vocab, (n, t)).astype(np.int32),
          "labels": rng.integers(0, vocab, (n, t)).astype(np.int32),
          "loss_mask": rng.random((n, t)) < 0.8}


def _reference(params, config, tokens, k):
  """Float64 NumPy top-k of the online teacher: ids, log-probs, log(1 - sum p_topk)."""
  logits = np.asarray(jax.jit(lambda p, x: models.apply(p, x, config=config).logits)(
      params, jnp.asarray(tokens)), np.float64)
  lp = logits - logits.max(-1, keepdims=True)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  order = np.argsort(-lp, axis=-1, kind="stable")
  ids = order[..., :k]
  top = np.take_along_axis(lp, ids, -1)
  with np.errstate(divide="ignore"):
    tail = np.log(1.0 - np.exp(top).sum(-1))
  # Ties (or near ties) at the k-th place make the id choice arbitrary.
  sorted_lp = np.take_along_axis(lp, order, -1)
  gap = sorted_lp[..., k - 1] - sorted_lp[..., k] if k < lp.shape[-1] else np.inf
  return ids, top, np.maximum(tail, tc.TAIL_FLOOR), gap, logits


def _read_all(path, n):
  src = open_split(path, "train")
  assert len(src) == n
  rows = [src[i] for i in range(n)]
  return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def test_cache_matches_online_teacher(tiny, rng, tmp_path):
  config, params = tiny
  n, t, k = 5, 12, 8
  ex = _examples(rng, n, t, config.vocab_size)
  path = tc.write_teacher_cache(ex, str(tmp_path), params=params, config=config, k=k,
                                batch_size=2, teacher="tiny", progress=False)
  got = _read_all(path, n)
  for f in ("tokens", "labels", "loss_mask"):  # same order, same count, exact
    np.testing.assert_array_equal(got[f], ex[f])
  assert got["teacher_topk_ids"].dtype == np.uint16
  assert got["teacher_topk_logprobs"].dtype == got["teacher_tail_logprob"].dtype == np.float16
  ids, top, tail, gap, _ = _reference(params, config, ex["tokens"], k)
  clear = gap > 1e-4
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got["teacher_topk_ids"][clear], ids[clear])
  np.testing.assert_allclose(got["teacher_topk_logprobs"].astype(np.float64), top,
                             rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(got["teacher_tail_logprob"].astype(np.float64), tail, rtol=1e-3)

  meta = read_metadata(path)
  assert (meta["kind"], meta["k"], meta["vocab"], meta["seq_len"], meta["count"]) == (
      "teacher_cache", k, 128, t, n)
  assert meta["teacher_fingerprint"] == tc.teacher_fingerprint(params, config)
  on_disk = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.array_record*")))
  assert meta["bytes_per_token"] == pytest.approx(on_disk / (n * t))
  assert tc.check_cache(path, vocab=128, k=k, split="train")["count"] == n


def test_sparse_divergence_on_cache_equals_online(tiny, rng, tmp_path):
  config, params = tiny
  n, t, k = 4, 10, 16
  ex = _examples(rng, n, t, config.vocab_size)
  path = tc.write_teacher_cache(ex, str(tmp_path), params=params, config=config, k=k,
                                batch_size=4, progress=False)
  got = _read_all(path, n)
  ids, top, tail, _, _ = _reference(params, config, ex["tokens"], k)
  student = jnp.asarray(rng.normal(size=(n, t, config.vocab_size)) * 2, jnp.float32)
  where = jnp.asarray(ex["loss_mask"])
  fn = jax.jit(lambda ids, lp, tail: losses.sparse_divergence(
      student, ids, lp, divergence="generalized_jsd", teacher_tail_logprob=tail, where=where))
  cached = fn(jnp.asarray(got["teacher_topk_ids"]), jnp.asarray(got["teacher_topk_logprobs"]),
              jnp.asarray(got["teacher_tail_logprob"]))
  online = fn(jnp.asarray(ids, jnp.int32), jnp.asarray(top, jnp.float32),
              jnp.asarray(tail, jnp.float32))
  assert float(jnp.abs(online).max()) > 1e-2  # not trivially zero
  np.testing.assert_allclose(np.asarray(cached), np.asarray(online), rtol=2e-3, atol=2e-4)


def test_topk_logprobs_extremes():
  # A peaked row: float32 log(1 - sum p_topk) would round to log(0); the complement is exact.
  v, k = 128, 4
  peaked = np.zeros(v, np.float32)
  peaked[0] = 20.0
  banned = np.zeros(v, np.float32)
  banned[10:] = -np.inf
  banned[:10] = np.arange(10)
  logits = np.stack([peaked, banned, np.full(v, -1e4, np.float32)])
  ids, lp, tail = jax.jit(tc.topk_logprobs, static_argnums=1)(jnp.asarray(logits), k)
  x = logits.astype(np.float64)
  with np.errstate(invalid="ignore"):
    ref_lp = x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(
        -1, keepdims=True)))
  np.testing.assert_array_equal(np.asarray(ids)[1], [9, 8, 7, 6])
  ref_top = np.take_along_axis(ref_lp, np.asarray(ids), -1)
  np.testing.assert_allclose(np.asarray(lp)[:2], ref_top[:2], rtol=1e-6, atol=1e-6)
  # Logits of -1e4: float32 resolves their logsumexp to ~1e-3 (one ulp at 1e4).
  np.testing.assert_allclose(np.asarray(lp)[2], ref_top[2], atol=2e-3)
  top_mass = np.exp(np.take_along_axis(ref_lp, np.asarray(ids), -1)).sum(-1)
  # Row 0: 1 - p_topk = 124 / (e^20 + 127), ~2.6e-7: formed in float64 from the sums.
  expected = np.log(np.array([124.0 / (np.exp(20.0) + 127.0),
                              1.0 - top_mass[1], 124.0 / 128.0]))
  np.testing.assert_allclose(np.asarray(tail)[:2], expected[:2], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(tail)[2], expected[2], atol=2e-3)
  assert np.isfinite(np.asarray(tail)).all()
  # k = vocab: no tail mass at all, stored as the finite floor.
  _, lp_all, tail_all = tc.topk_logprobs(jnp.asarray(logits), v)
  np.testing.assert_array_equal(np.asarray(tail_all), tc.TAIL_FLOOR)
  assert not np.isnan(np.asarray(lp_all)).any()


def test_bad_input_is_a_clear_error(tiny, rng, tmp_path):
  config, params = tiny
  kw = dict(params=params, config=config, progress=False)
  ex = _examples(rng, 3, 8, 128)
  ragged = [{f: v[i] for f, v in ex.items()} for i in range(3)]
  ragged[2] = {f: v[:6] for f, v in ragged[2].items()}
  with pytest.raises(ValueError, match=r"example 2: tokens has shape \[6\], expected \[8\]"):
    tc.write_teacher_cache(ragged, str(tmp_path), name="a", **kw)
  with pytest.raises(ValueError, match="lacks \\['loss_mask'\\]"):
    tc.write_teacher_cache([{"tokens": ex["tokens"][0], "labels": ex["labels"][0]}],
                           str(tmp_path), name="b", **kw)
  bad = dict(ex, tokens=ex["tokens"].copy())
  bad["tokens"][1, 3] = 500
  with pytest.raises(ValueError, match=r"example 1: token id 500 is outside .*\[0, 128\)"):
    tc.write_teacher_cache(bad, str(tmp_path), name="c", **kw)
  with pytest.raises(ValueError, match="k must be an int in \\[1, vocab=128\\]"):
    tc.write_teacher_cache(ex, str(tmp_path), name="d", k=129, **kw)
  with pytest.raises(ValueError, match="id_dtype uint8 cannot hold token ids up to 299"):
    tc.write_teacher_cache(ex, str(tmp_path), name="e", params=params,
                           config=config.replace(vocab_size=300), id_dtype=np.uint8)
  with pytest.raises(ValueError, match="examples is empty"):
    tc.write_teacher_cache([], str(tmp_path), name="f", **kw)


def test_check_cache_and_cli_npz(tiny, rng, tmp_path):
  config, params = tiny
  ex = _examples(rng, 3, 8, config.vocab_size)
  npz = tmp_path / "tok.npz"
  np.savez(npz, **ex)
  spec = "random:" + json.dumps(dict(TINY, seed=3))
  path = tc.main(["--teacher", spec, "--dataset", str(npz), "--k", "4", "--out",
                  str(tmp_path / "out"), "--batch_size", "2", "--no_progress"])
  got = _read_all(path, 3)
  np.testing.assert_array_equal(got["tokens"], ex["tokens"])
  ids, top, _, gap, _ = _reference(params, config, ex["tokens"], 4)  # the same random teacher
  np.testing.assert_array_equal(got["teacher_topk_ids"][gap > 1e-4], ids[gap > 1e-4])
  meta = read_metadata(path)
  assert meta["teacher"] == spec and meta["source"] == str(npz)
  with pytest.raises(ValueError, match="teacher vocab 128 but the student has vocab 49152"):
    tc.check_cache(path, vocab=49152)
  with pytest.raises(ValueError, match="holds top-4 but k=32 was asked"):
    tc.check_cache(path, vocab=128, k=32)
  with pytest.raises(ValueError, match="--seq_len is 16"):
    tc.main(["--teacher", spec, "--dataset", str(npz), "--seq_len", "16", "--out",
             str(tmp_path / "o2")])


def test_text_dataset_examples(tiny, tmp_path):
  """A prompt_completion dataset, tokenized through jkd.data.examples, then cached."""
  from jkd.data import store
  config, params = tiny
  feats = {f: store.text_feature() for f in ("prompt", "completion", "domain")}
  rows = [{"prompt": f"Say {i}", "completion": "ok " * (i + 1), "domain": ""} for i in range(3)]
  src = store.write_dataset(str(tmp_path), "pc", feats, {"train": rows},
                            metadata={"shape": "prompt_completion"})
  tok = model_spec.char_tokenizer(config.vocab_size)
  counts = {}
  examples = tc._dataset_examples(src, "train", tok, seq_len=24, vocab_size=128, shape=None,
                                  chat_template=True, counts=counts)
  path = tc.write_teacher_cache(examples, str(tmp_path / "out"), params=params, config=config,
                                k=4, progress=False)
  got = _read_all(path, 3)
  prompt = tok.apply_chat_template([{"role": "user", "content": "Say 0"}],
                                   add_generation_prompt=True, return_dict=False)
  np.testing.assert_array_equal(got["tokens"][0, :len(prompt)], prompt)
  assert got["loss_mask"].sum(-1).tolist() == [4, 7, 10]  # "ok " * (i + 1) and <eos>
  ids, _, _, gap, _ = _reference(params, config, got["tokens"], 4)
  np.testing.assert_array_equal(got["teacher_topk_ids"][gap > 1e-4], ids[gap > 1e-4])


@pytest.mark.slow
def test_smollm2_cache(tmp_path):
  """The real teacher: 2 sequences x 32 tokens, k=32; cached == online."""
  config, params = models.load_gguf(models.smollm2_gguf_path())
  rng = np.random.default_rng(0)
  n, t, k = 2, 32, 32
  ex = _examples(rng, n, t, config.vocab_size)
  path = tc.write_teacher_cache(ex, str(tmp_path), params=params, config=config, k=k,
                                batch_size=2, teacher="smollm2", progress=False)
  got = _read_all(path, n)
  ids, top, tail, gap, _ = _reference(params, config, ex["tokens"], k)
  clear = gap > 1e-3
  np.testing.assert_array_equal(got["teacher_topk_ids"][clear], ids[clear])
  np.testing.assert_allclose(got["teacher_topk_logprobs"].astype(np.float64), top,
                             rtol=1e-3, atol=2e-3)
  np.testing.assert_allclose(got["teacher_tail_logprob"].astype(np.float64), tail, rtol=2e-3,
                             atol=2e-3)
  meta = tc.check_cache(path, vocab=49152, k=32)
  # ids 2k + log-probs 2k + tail 2 + tokens 4 + labels 4 + mask 1 bytes.
  assert meta["id_dtype"] == "uint16" and meta["payload_bytes_per_token"] == 4 * k + 11
