"""Fused (chunked) linear losses (jkd.losses.fused) against the unfused form and the reference.

The fused functions take hidden states and output heads and never hold more than
``chunk_size x vocab`` logits; their loss and its gradient wrt the student's hidden states and
head must equal the unfused computation: ``logits = hidden @ head``, the per-token loss, then a
masked mean (or the weighted sum with custom weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from jkd import losses

# The library is always evaluated under jax.jit. Test programs are tiny and compiled once each,
# so compile time dominates the suite: LLVM's backend optimisations (which do not change IEEE
# float semantics, only the speed of the generated code) are turned off: ~40% less compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SPECS = ref.ONE_PER_NAME  # every divergence name; option sweeps are in test_divergences.py
SPEC_IDS = [s[0] for s in SPECS]
B, S, HS, HT, V = 2, 7, 8, 6, 13  # N = 14 tokens: not a multiple of the chunk size
CHUNK = 4
K = 4


def _inputs(rng):
  hs = (rng.standard_normal((B, S, HS)) / np.sqrt(HS)).astype(np.float32)
  ws = (rng.standard_normal((HS, V)) * 2.0).astype(np.float32)
  ht = (rng.standard_normal((B, S, HT)) / np.sqrt(HT)).astype(np.float32)
  wt = (rng.standard_normal((HT, V)) * 2.0).astype(np.float32)
  where = rng.random((B, S)) < 0.7
  where[0, 0], where[1, -1] = True, False
  weights = rng.random((B, S)).astype(np.float32)
  return hs, ws, ht, wt, where, weights


def _options(options, t):
  """TAID's ``t`` as a traced array (the fused path's array options), others as given."""
  return {**options, "t": t} if "t" in options else options


# Cases: (temperature, custom weights), each with a mask. Each case costs one compilation of
# the fused and unfused forms of its names: every name with custom weights at T = 2, and a few
# with the default weights (the masked token mean) at T = 1; the weights never reach the core.
CASES = [(2.0, True), (1.0, False)]
CASE_IDS = ["T2-weights", "T1-masked_mean"]
MASKED_MEAN_SPECS = [s for s in SPECS if s[0] in ("forward_kl", "jsd_b0.5", "taid_t0.4")]


def _case_params(cases, case_ids, masked_mean_specs):
  """(spec, case) pairs: every spec with custom weights, a subset with the masked mean."""
  params = []
  for case, cid in zip(cases, case_ids):
    for spec in (SPECS if case[-1] else masked_mean_specs):
      params.append(pytest.param(spec, case, id=f"{spec[0]}-{cid}"))
  return params


@functools.cache
def _divergence_pair(temperature: float, custom_weights: bool):
  """One jitted function: fused and unfused (loss, per-token, grads) for every name."""
  def run(hs, ws, ht, wt, where, weights, t):
    out = {}
    for sid, name, options in (SPECS if custom_weights else MASKED_MEAN_SPECS):
      options = _options(options, t)
      w = weights if custom_weights else None

      def fused(hs, ws, w):
        return losses.fused_linear_divergence(
            hs, ws, ht, wt, divergence=name, temperature=temperature, where=where, weights=w,
            chunk_size=CHUNK, **options)

      def unfused(hs, ws, w):
        values = losses.full_divergence(name, hs @ ws, ht @ wt, temperature=temperature,
                                        where=where, **options)
        if w is None:
          return losses.masked_mean(values, where), values
        return jnp.sum(values * w), values

      argnums = (0, 1, 2) if custom_weights else (0, 1)
      out[sid] = {
          kind: jax.value_and_grad(fn, argnums=argnums, has_aux=True)(hs, ws, w)
          for kind, fn in (("fused", fused), ("unfused", unfused))}
    return out
  return jit(run)


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-6, err_msg=""):
  actual = np.asarray(actual)
  assert not np.isnan(actual).any(), f"NaN in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=err_msg)


@pytest.mark.parametrize("spec,case", _case_params(CASES, CASE_IDS, MASKED_MEAN_SPECS))
def test_fused_divergence_equals_unfused(spec, case, rng):
  _, name, options = spec
  temperature, custom_weights = case
  hs, ws, ht, wt, where, weights = _inputs(rng)
  out = _divergence_pair(temperature, custom_weights)(hs, ws, ht, wt, where, weights,
                                                      jnp.float32(options.get("t", 0.0)))
  (f_loss, f_values), f_grads = out[spec[0]]["fused"]
  (u_loss, u_values), u_grads = out[spec[0]]["unfused"]
  assert f_loss.shape == () and f_loss.dtype == jnp.float32
  assert_close(f_loss, u_loss, err_msg="loss")
  assert_close(f_values, u_values, err_msg="per-token values")
  for i, (fg, ug) in enumerate(zip(f_grads, u_grads)):
    assert fg.shape == ug.shape
    assert_close(fg, ug, rtol=1e-4, atol=1e-6, err_msg=f"gradient {i}")
  if custom_weights:  # d loss / d weights = the per-token values, masked
    assert_close(f_grads[2], np.where(where, u_values, 0.0), err_msg="weights gradient")
  # And the number itself, from the float64 reference.
  zs = ref.f64(hs) @ ref.f64(ws)
  zt = ref.f64(ht) @ ref.f64(wt)
  values = ref.full_divergence(name, zs, zt, temperature=temperature, where=where, **options)
  expected = np.sum(values * weights) if custom_weights else ref.masked_mean(values, where)
  assert_close(f_loss, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(f_values)[~where], 0.0)
  np.testing.assert_array_equal(np.asarray(f_grads[0])[~where], 0.0)


# ----------------------------------------------------------------------------------------------
# Sparse teacher.
# ----------------------------------------------------------------------------------------------

SPARSE_CASES = [(True, 2.0, True), (False, 1.0, False)]  # (tail, temperature, custom weights)
SPARSE_CASE_IDS = ["tail-T2-weights", "no_tail-T1-masked_mean"]
SPARSE_MASKED_MEAN_SPECS = [s for s in SPECS if s[0] in ("reverse_kl", "skew_kl",
                                                         "total_variation")]


@functools.cache
def _sparse_pair(tail: bool, temperature: float, custom_weights: bool):
  def run(hs, ws, ids, lp, where, weights, t):
    out = {}
    for sid, name, options in (SPECS if custom_weights else SPARSE_MASKED_MEAN_SPECS):
      options = _options(options, t)
      w = weights if custom_weights else None

      def fused(hs, ws):
        return losses.fused_linear_sparse_divergence(
            hs, ws, ids, lp, divergence=name, tail=tail, temperature=temperature, where=where,
            weights=w, chunk_size=CHUNK, **options)

      def unfused(hs, ws):
        values = losses.sparse_divergence(hs @ ws, ids, lp, divergence=name, tail=tail,
                                          temperature=temperature, where=where, **options)
        if w is None:
          return losses.masked_mean(values, where), values
        return jnp.sum(values * w), values

      out[sid] = {kind: jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(hs, ws)
                  for kind, fn in (("fused", fused), ("unfused", unfused))}
    return out
  return jit(run)


@pytest.mark.parametrize("spec,case",
                         _case_params(SPARSE_CASES, SPARSE_CASE_IDS, SPARSE_MASKED_MEAN_SPECS))
def test_fused_sparse_divergence_equals_unfused(spec, case, rng):
  _, name, options = spec
  tail, temperature, custom_weights = case
  hs, ws, ht, wt, where, weights = _inputs(rng)
  ids, lp = ref.topk(ref.f64(ht) @ ref.f64(wt), K)
  ids, lp = ids.astype(np.int32), lp.astype(np.float32)
  out = _sparse_pair(tail, temperature, custom_weights)(
      hs, ws, ids, lp, where, weights, jnp.float32(options.get("t", 0.0)))
  (f_loss, f_values), f_grads = out[spec[0]]["fused"]
  (u_loss, u_values), u_grads = out[spec[0]]["unfused"]
  assert_close(f_loss, u_loss, err_msg="loss")
  assert_close(f_values, u_values, err_msg="per-token values")
  for i, (fg, ug) in enumerate(zip(f_grads, u_grads)):
    assert_close(fg, ug, rtol=1e-4, atol=1e-6, err_msg=f"gradient {i}")
  values = ref.sparse_divergence(name, ref.f64(hs) @ ref.f64(ws), ids, lp, tail=tail,
                                 temperature=temperature, where=where, **options)
  expected = np.sum(values * weights) if custom_weights else ref.masked_mean(values, where)
  assert_close(f_loss, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Cross-entropy.
# ----------------------------------------------------------------------------------------------

def test_fused_cross_entropy_equals_unfused(rng):
  hs, ws, _, _, where, weights = _inputs(rng)
  labels = rng.integers(0, V, (B, S)).astype(np.int32)
  labels[0, :2] = losses.IGNORE_INDEX
  counted = (labels != losses.IGNORE_INDEX) & where

  @jit
  def run(hs, ws, weights):
    def fused(hs, ws, w):
      return losses.fused_linear_cross_entropy(hs, ws, labels, where=where, weights=w,
                                               chunk_size=CHUNK)

    def unfused(hs, ws, w):
      values = losses.cross_entropy(hs @ ws, labels, where=where)
      if w is None:
        return losses.masked_mean(values, counted), values
      return jnp.sum(values * w), values
    return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws, w)
            for w in (None, weights) for f in (fused, unfused)]

  results = run(hs, ws, weights)
  for (f, u), w in zip((results[:2], results[2:]), (None, weights)):
    (f_loss, f_values), f_grads = f
    (u_loss, u_values), u_grads = u
    assert_close(f_loss, u_loss)
    assert_close(f_values, u_values)
    for fg, ug in zip(f_grads, u_grads):
      assert_close(fg, ug, rtol=1e-4, atol=1e-6)
    ce = ref.cross_entropy(ref.f64(hs) @ ref.f64(ws), labels, where=where)
    expected = ref.masked_mean(ce, counted) if w is None else np.sum(ce * w)
    assert_close(f_loss, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(f_values)[~counted], 0.0)


# ----------------------------------------------------------------------------------------------
# Chunking, vmap, dtypes.
# ----------------------------------------------------------------------------------------------

def test_chunk_size_does_not_change_the_result(rng):
  hs, ws, ht, wt, where, _ = _inputs(rng)

  @functools.partial(jit, static_argnames="chunk_size")
  def run(hs, ws, chunk_size):
    return jax.value_and_grad(lambda a, b: losses.fused_linear_divergence(
        a, b, ht, wt, divergence="generalized_jsd", where=where, chunk_size=chunk_size)[0],
        argnums=(0, 1))(hs, ws)

  base_loss, base_grads = run(hs, ws, 1)
  for chunk_size in (3, 512):  # 512 > N: one chunk
    loss, grads = run(hs, ws, chunk_size)
    assert_close(loss, base_loss)
    for g, bg in zip(grads, base_grads):
      assert_close(g, bg, rtol=1e-4, atol=1e-6)


def test_vmap_over_batch(rng):
  """vmap of the fused loss over the batch axis gives per-sequence masked means; their sum is
  the batched call with per-sequence weights, in value and gradient."""
  hs, ws, ht, wt, where, _ = _inputs(rng)
  seq_weights = where / where.sum(-1, keepdims=True)

  @jit
  def run(hs, ws):
    def mapped(hs, ws):
      per_seq = jax.vmap(lambda h, t, m: losses.fused_linear_divergence(
          h, ws, t, wt, divergence="generalized_jsd", temperature=2.0, where=m,
          chunk_size=CHUNK)[0])(hs, ht, where)
      return jnp.sum(per_seq), per_seq

    def batched(hs, ws):
      loss, _ = losses.fused_linear_divergence(
          hs, ws, ht, wt, divergence="generalized_jsd", temperature=2.0, where=where,
          weights=seq_weights, chunk_size=CHUNK)
      return loss, losses.sequence_mean(losses.generalized_jsd(hs @ ws, ht @ wt,
                                                               temperature=2.0), where)
    return [jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)
            for f in (mapped, batched)]

  ((m_loss, m_per_seq), m_grads), ((b_loss, b_per_seq), b_grads) = run(hs, ws)
  assert_close(m_loss, b_loss)
  assert_close(m_per_seq, b_per_seq)
  for mg, bg in zip(m_grads, b_grads):
    assert_close(mg, bg, rtol=1e-4, atol=1e-6)


def test_bf16_inputs(rng):
  hs, ws, ht, wt, where, _ = _inputs(rng)
  def loss_fn(*args):
    return losses.fused_linear_divergence(*args, where=where, chunk_size=CHUNK)
  f = jit(loss_fn)
  cast = [jnp.asarray(x, jnp.bfloat16) for x in (hs, ws, ht, wt)]
  loss, values = f(*cast)
  assert loss.dtype == jnp.float32 and values.dtype == jnp.float32
  rounded, _ = f(*[np.asarray(x, np.float32) for x in cast])
  assert_close(loss, rounded, rtol=1e-5)
  full, _ = f(hs, ws, ht, wt)
  assert_close(loss, full, rtol=5e-2, atol=1e-2)
  grads = jit(jax.grad(lambda a, b: loss_fn(a, b, *cast[2:])[0], argnums=(0, 1)))(*cast[:2])
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
  # A bf16-compute student with float32 parameters: bf16 hidden states, a float32 head; the
  # head's gradient stays float32 and follows the float32 one.
  mixed = jit(jax.grad(lambda a, b: loss_fn(a, b, *cast[2:])[0], argnums=(0, 1)))(cast[0], ws)
  assert [g.dtype for g in mixed] == [jnp.bfloat16, jnp.float32]
  exact = jit(jax.grad(lambda a, b: loss_fn(a, b, ht, wt)[0], argnums=1))(hs, ws)
  assert float(jnp.linalg.norm(mixed[1] - exact)) <= 0.05 * float(jnp.linalg.norm(exact))


def test_masked_garbage_positions_leak_no_nan(rng):
  """Padding positions of a sparse cache may hold -inf log-probs: no NaN gradient from them."""
  hs, ws, ht, wt, where, _ = _inputs(rng)
  ids, lp = ref.topk(ref.f64(ht) @ ref.f64(wt), K)
  ids, lp = ids.astype(np.int32), lp.astype(np.float32)
  lp[~where] = -np.inf
  grads = jit(jax.grad(lambda a, b: losses.fused_linear_sparse_divergence(
      a, b, ids, lp, divergence="reverse_kl", where=where, chunk_size=CHUNK)[0],
      argnums=(0, 1)))(hs, ws)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  np.testing.assert_array_equal(np.asarray(grads[0])[~where], 0.0)


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(rng):
  hs, ws, ht, wt, where, weights = _inputs(rng)
  f = losses.fused_linear_divergence
  with pytest.raises(ValueError, match=f"teacher vocab {V + 1} != student vocab {V}"):
    f(hs, ws, ht, np.zeros((HT, V + 1), np.float32))
  with pytest.raises(ValueError, match="must be \\[..., H\\] and \\[H, V\\] with the same H"):
    f(hs, np.zeros((HS + 1, V), np.float32), ht, wt)
  with pytest.raises(ValueError, match="teacher_hidden positions"):
    f(hs, ws, ht[:1], wt)
  with pytest.raises(ValueError, match="teacher_head"):
    f(hs, ws, ht, np.zeros((HT + 1, V), np.float32))
  with pytest.raises(ValueError, match="where has shape"):
    f(hs, ws, ht, wt, where=where[0])
  with pytest.raises(ValueError, match="weights shape"):
    f(hs, ws, ht, wt, weights=weights[0])
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    f(hs, ws, ht, wt, chunk_size=0)
  with pytest.raises(TypeError, match="student_hidden must be a floating-point array"):
    f(hs.astype(np.int32), ws, ht, wt)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    f(hs, ws, ht, wt, temperature=0.0)
  with pytest.raises(ValueError, match="unknown divergence 'kl'"):
    f(hs, ws, ht, wt, divergence="kl")
  with pytest.raises(TypeError, match=r"takes no option\(s\) \['mu'\]"):
    f(hs, ws, ht, wt, divergence="forward_kl", mu=0.5)
  with pytest.raises(ValueError, match="beta must lie in"):
    f(hs, ws, ht, wt, divergence="generalized_jsd", beta=1.5)
  ids = np.zeros((B, S, K), np.int32)
  lp = np.full((B, S, K), -1.0, np.float32)
  g = losses.fused_linear_sparse_divergence
  with pytest.raises(ValueError, match="teacher_ids contains ids outside the vocabulary"):
    g(hs, ws, np.full((B, S, K), V, np.int32), lp)
  with pytest.raises(ValueError, match="teacher_logprobs shape"):
    g(hs, ws, ids, lp[..., :2])
  with pytest.raises(ValueError, match="unknown divergence"):
    g(hs, ws, ids, lp, divergence="fkl")
  labels = np.zeros((B, S), np.int32)
  h = losses.fused_linear_cross_entropy
  with pytest.raises(ValueError, match=r"labels contains ids outside the vocabulary \[0, 13\)"):
    h(hs, ws, labels + V)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    h(hs, ws, labels - 1)  # -1 is not the ignore index


# ----------------------------------------------------------------------------------------------
# The head's gradient by vocabulary blocks.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", [("forward_kl", {}), ("reverse_kl", {}),
                                           ("generalized_jsd", {"beta": 0.3}),
                                           ("cross_entropy", {})])
def test_vocab_blocks_equal_the_token_sweep_and_the_unfused_form(name, options, rng):
  """Blocks of 4 columns over V = 13 (the last block overlaps the one before it), blocks of
  the whole vocabulary, and the token sweep (vocab_block=None) give the unfused form's loss,
  per-token values and gradients (hidden states, head, weights), with a mask, weights, T = 2."""
  hs, ws, ht, wt, where, weights = _inputs(rng)
  labels = rng.integers(0, V, (B, S)).astype(np.int32)
  labels[0, :2] = losses.IGNORE_INDEX
  t = 1.0 if name == "cross_entropy" else 2.0

  @functools.partial(jit, static_argnames="vocab_block")
  def fused(hs, ws, w, vocab_block):
    def f(hs, ws, w):
      if name == "cross_entropy":
        return losses.fused_linear_cross_entropy(hs, ws, labels, where=where, weights=w,
                                                 chunk_size=CHUNK, vocab_block=vocab_block)
      return losses.fused_linear_divergence(hs, ws, ht, wt, divergence=name, temperature=t,
                                            where=where, weights=w, chunk_size=CHUNK,
                                            vocab_block=vocab_block, **options)
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(hs, ws, w)

  @jit
  def unfused(hs, ws, w):
    def f(hs, ws, w):
      if name == "cross_entropy":
        values = losses.cross_entropy(hs @ ws, labels, where=where)
      else:
        values = losses.full_divergence(name, hs @ ws, ht @ wt, temperature=t, where=where,
                                        **options)
      return jnp.sum(values * w), values
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(hs, ws, w)

  (u_loss, u_values), u_grads = unfused(hs, ws, weights)
  counted = where & (labels != losses.IGNORE_INDEX) if name == "cross_entropy" else where
  for vocab_block in (4, V, None):
    (loss, values), grads = fused(hs, ws, weights, vocab_block)
    what = f"vocab_block={vocab_block}"
    assert_close(loss, u_loss, err_msg=what)
    assert_close(values, np.where(counted, u_values, 0.0), err_msg=what)
    for i, (g, ug) in enumerate(zip(grads, u_grads)):
      expected = np.where(counted, ug, 0.0) if i == 2 else ug
      assert_close(g, expected, rtol=1e-4, atol=1e-6, err_msg=f"{what} gradient {i}")
  # The number itself, from the float64 reference.
  if name == "cross_entropy":
    per_token = ref.cross_entropy(ref.f64(hs) @ ref.f64(ws), labels, where=where)
  else:
    per_token = ref.full_divergence(name, ref.f64(hs) @ ref.f64(ws), ref.f64(ht) @ ref.f64(wt),
                                    temperature=t, where=where, **options)
  assert_close(fused(hs, ws, weights, 4)[0][0], np.sum(per_token * weights), rtol=1e-4,
               atol=1e-5)


def test_bad_vocab_block_is_an_error(rng):
  hs, ws, ht, wt, _, _ = _inputs(rng)
  with pytest.raises(ValueError, match="vocab_block must be a positive int"):
    losses.fused_linear_divergence(hs, ws, ht, wt, vocab_block=0)
