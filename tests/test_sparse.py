"""Sparse-teacher divergences (jkd.losses.sparse) against the float64 NumPy reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference as ref
from jkd import losses

# The library is always evaluated under jax.jit. Test programs are tiny and compiled once each,
# so compile time dominates the suite: LLVM's backend optimisations (which do not change IEEE
# float semantics, only the speed of the generated code) are turned off: ~40% less compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SPECS = ref.ONE_PER_NAME  # every divergence; option sweeps are in test_divergences.py
SPEC_IDS = [s[0] for s in SPECS]
TEMPERATURES = [1.0, 2.0]
SHAPE = (2, 3, 16)  # [batch, seq, vocab]
K = 5


@functools.cache
def _all_specs(temperature: float, tail: bool, masked: bool, given_tail: bool, with_grad: bool):
  """One jitted function for every spec: values (and the gradient wrt the student logits).

  Compiled once per configuration and cached: the per-spec tests look up their entry.
  """
  def one(name, options, zs, ids, lp, tail_lp, where):
    f = functools.partial(losses.sparse_divergence, divergence=name, tail=tail,
                          temperature=temperature, where=where, **options)
    if not with_grad:
      return f(zs, ids, lp, teacher_tail_logprob=tail_lp), None
    (_, values), grad = jax.value_and_grad(lambda x: (
        jnp.sum(f(x, ids, lp, teacher_tail_logprob=tail_lp)),
        f(x, ids, lp, teacher_tail_logprob=tail_lp)), has_aux=True)(zs)
    return values, grad

  def run(zs, ids, lp, tail_lp, where):
    return {sid: one(name, options, zs, ids, lp, tail_lp if given_tail else None,
                     where if masked else None)
            for sid, name, options in SPECS}
  return jit(run)


def evaluate(spec, zs, ids, lp, *, tail=True, temperature=1.0, where=None,
             teacher_tail_logprob=None, with_grad=True):
  """``(values, grad of their sum wrt zs)`` of ``sparse_divergence`` under ``jax.jit``."""
  if not tail:  # ignored without a tail bin: share the compilation
    teacher_tail_logprob = None
  fn = _all_specs(float(temperature), tail, where is not None, teacher_tail_logprob is not None,
                  with_grad)
  values, grad = fn(zs, ids, lp, teacher_tail_logprob, where)[spec[0]]
  return np.asarray(values), (None if grad is None else np.asarray(grad))


def logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def teacher_topk(rng, zt, k, *, shuffle=True):
  """Top-k ids (int32) and float32 log-probs at T=1, in a random order per position."""
  ids, lp = ref.topk(zt, k)
  if shuffle:
    perm = np.argsort(rng.random(ids.shape), axis=-1)
    ids, lp = np.take_along_axis(ids, perm, -1), np.take_along_axis(lp, perm, -1)
  return ids.astype(np.int32), lp.astype(np.float32)


def assert_close(actual, expected, *, rtol=2e-5, atol=2e-6):
  actual = np.asarray(actual)
  assert not np.isnan(actual).any(), f"NaN in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def frozen_bins_options(name, student, teacher, options):
  """Reference options freezing the stop-gradient parts on the bins (AKL weights, TAID target)."""
  options = dict(options)
  if name == "adaptive_kl":
    options["weights"] = ref.adaptive_kl_weights(student, teacher, mu=options["mu"])
  elif name == "balanced_kl":
    options["weights"] = ref.balanced_kl_weights(student, teacher)
  elif name == "taid":
    options["target"] = ref.taid_target(student, teacher, t=options["t"])
  return options


# ----------------------------------------------------------------------------------------------
# Values and gradients vs the reference.
# ----------------------------------------------------------------------------------------------

TAIL_IDS = ["tail", "no_tail"]
GRAD_CASES = [(True, 1.0), (True, 2.0), (False, 1.0), (False, 2.0)]  # (tail, temperature)
GRAD_CASE_IDS = ["tail-T1", "tail-T2", "no_tail-T1", "no_tail-T2"]
#: The extreme-input cases: one compilation each, both tail modes and temperatures covered.
EXTREME_CASES = [(True, 2.0), (False, 1.0)]
EXTREME_CASE_IDS = ["tail-T2", "no_tail-T1"]


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", [True, False], ids=TAIL_IDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_values_match_reference(spec, tail, temperature, rng):
  _, name, options = spec
  zs, zt = logits(rng, SHAPE, scale=2.0), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  values, _ = evaluate(spec, zs, ids, lp, tail=tail, temperature=temperature, with_grad=False)
  expected = ref.sparse_divergence(name, zs, ids, lp, tail=tail, temperature=temperature,
                                   **options)
  assert values.shape == SHAPE[:-1] and values.dtype == np.float32
  assert_close(values, expected, atol=2e-6 * temperature ** 2)


@pytest.mark.parametrize("case", GRAD_CASES, ids=GRAD_CASE_IDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_grads_match_reference_finite_differences(spec, case, rng):
  """Gradient wrt the student logits vs central differences of the float64 reference, the
  stop-gradient parts (AKL weights, TAID target) frozen at the evaluation point."""
  _, name, options = spec
  tail, temperature = case
  zs, zt = logits(rng, SHAPE, scale=2.0), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  _, grad = evaluate(spec, zs, ids, lp, tail=tail, temperature=temperature)

  def ref_values(x):
    student, teacher = ref.sparse_bins(x, ids, lp, tail=tail, temperature=temperature)
    return ref.divergence(name, student, teacher, **frozen) * temperature ** 2
  frozen = frozen_bins_options(name, *ref.sparse_bins(zs, ids, lp, tail=tail,
                                                      temperature=temperature), options)
  assert_close(grad, ref.numerical_grad(ref_values, zs), rtol=1e-4, atol=2e-6 * temperature)


def test_sparse_bins_match_reference(rng):
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  f = jit(functools.partial(losses.sparse_bins, temperature=2.0), static_argnames="tail")
  for tail in (True, False):
    student, teacher = f(zs, ids, lp, tail=tail)
    want_s, want_t = ref.sparse_bins(zs, ids, lp, tail=tail, temperature=2.0)
    assert student.shape == SHAPE[:-1] + (K + tail,)
    assert_close(student, want_s, atol=1e-5)
    assert_close(teacher, want_t, atol=1e-5)
    np.testing.assert_allclose(np.exp(student).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.exp(teacher).sum(-1), 1.0, rtol=1e-5)


def test_check_grads_float64(rng, x64):
  """Autodiff vs finite differences in float64, every divergence without a stop-gradient.

  (With the tail bin, at T = 2: the tempering of both sides is on the path. The other cases and
  the stop-gradient divergences are checked against the reference's finite differences above.)
  """
  specs = [s for s in SPECS if s[1] in ref.NO_STOP_GRADIENT]
  zt = logits(rng, (3, 12))
  ids, lp = teacher_topk(rng, zt, 4)
  zs = jnp.asarray(rng.standard_normal((3, 12)) * 2.0)
  lp64 = jnp.asarray(lp, jnp.float64)
  f = jax.jit(lambda x: jnp.stack([  # check_grads nests it: no compiler options
      losses.sparse_divergence(x, ids, lp64, divergence=name, temperature=2.0,
                               **options)
      for _, name, options in specs]))
  assert f(zs).dtype == jnp.float64
  check_grads(f, (zs,), order=1, modes=["rev"])


# ----------------------------------------------------------------------------------------------
# Exactness at k = V, convergence as k grows.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", [True, False], ids=TAIL_IDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_k_equals_vocab_is_the_full_form(spec, tail, temperature, rng):
  _, name, options = spec
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids = np.argsort(rng.random(SHAPE), axis=-1).astype(np.int32)  # a permutation of the vocab
  lp = np.take_along_axis(ref.log_softmax(zt), ids, -1).astype(np.float32)
  values, _ = evaluate(spec, zs, ids, lp, tail=tail, temperature=temperature, with_grad=False)
  assert_close(values, ref.full_divergence(name, zs, zt, temperature=temperature, **options),
               atol=2e-6 * temperature ** 2)


def _peaked_teacher(rng, n_rows, vocab):
  zt = rng.standard_normal((n_rows, vocab)) * 2.0
  zt[np.arange(n_rows), rng.integers(0, vocab, n_rows)] += 6.0
  return zt.astype(np.float32)


KS = (1, 3, 8, 15)


@functools.cache
def _sparse_over_k():
  """One jitted function: every spec's sparse loss for every k in KS (tail, T = 1)."""
  return jit(lambda zs, topks: {
      sid: [losses.sparse_divergence(zs, ids, lp, divergence=name, **options)
            for ids, lp in topks]
      for sid, name, options in SPECS})


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_error_shrinks_as_k_grows(spec, rng):
  """With the tail bin, the error vs the full loss shrinks as k grows (exact at k=V: above).

  For the f-divergences the error never increases with k: this is the data-processing
  inequality, as the k+1 bins coarsen the vocabulary and the bins of a larger k refine those of
  a smaller k (top-k ids are nested). AKL's head/tail weights and
  TAID's interpolated target (t < 1) change with the bins, so no such guarantee holds for them:
  for those only the overall shrinkage is checked.
  """
  _, name, options = spec
  vocab = 16
  zs, zt = logits(rng, (4, vocab), scale=1.0), _peaked_teacher(rng, 4, vocab)
  topks = [teacher_topk(rng, zt, k, shuffle=False) for k in KS]
  full = ref.full_divergence(name, zs, zt, **options)
  errors = np.abs(np.stack(_sparse_over_k()(zs, topks)[spec[0]]) - full)  # [len(KS), rows]
  assert not np.isnan(errors).any()
  # The same holds for the float64 reference.
  ref_errors = np.stack([np.abs(ref.sparse_divergence(name, zs, ids, lp, **options) - full)
                         for ids, lp in topks])
  # float32 noise: the last k leave the teacher a tail of ~1e-6, whose log (which reverse KL
  # weighs by the student's tail mass) the float32 log-probs only fix to ~1e-3.
  np.testing.assert_allclose(errors, ref_errors, rtol=1e-4, atol=1e-4)
  assert errors[-1].max() < 0.01 * errors.max(), errors  # it does shrink
  if name in ref.F_DIVERGENCES:
    assert (np.diff(ref_errors, axis=0) <= 1e-9).all(), ref_errors
    assert (np.diff(errors, axis=0) <= 1e-4).all(), errors


def test_explicit_teacher_tail_logprob(rng):
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  tail64 = np.log1p(-np.exp(ref.topk(zt, K)[1]).sum(-1))  # exact, from float64
  f = jit(lambda *a, **kw: [losses.sparse_divergence(
      *a, divergence=d, temperature=2.0, **kw) for d in ("forward_kl", "reverse_kl")])
  given = f(zs, ids, lp, teacher_tail_logprob=tail64.astype(np.float32))
  computed = f(zs, ids, lp)
  for d, g, c in zip(("forward_kl", "reverse_kl"), given, computed):
    expected = ref.sparse_divergence(d, zs, ids, lp, temperature=2.0,
                                     teacher_tail_logprob=tail64)
    assert_close(g, expected, atol=1e-5)
    np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Masks, dtypes, vmap.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mask_equivalence(spec, rng):
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  m = np.zeros(6, bool)
  m[rng.permutation(6)[:4]] = True
  m = m.reshape(SHAPE[:-1])
  masked, grad = evaluate(spec, zs, ids, lp, temperature=2.0, where=m)
  unmasked, _ = evaluate(spec, zs[m], ids[m], lp[m], temperature=2.0, with_grad=False)
  np.testing.assert_allclose(masked[m], unmasked, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(masked[~m], 0.0)
  np.testing.assert_array_equal(grad[~m], 0.0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_masked_positions_with_garbage_leak_no_nan(spec, rng):
  """Padding positions of a cache may hold anything: -inf log-probs, -inf logits, bad ids."""
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  m = np.array([[True, True, False], [True, False, False]])
  zs[0, 2, :8] = -np.inf
  lp[1, 1] = -np.inf
  lp[1, 2, 1:] = -np.inf
  ids[1, 2, :2] = -1, 99  # padding ids, out of the vocabulary
  values, grad = evaluate(spec, zs, ids, lp, temperature=2.0, where=m)
  assert not np.isnan(values).any() and not np.isnan(grad).any()
  np.testing.assert_array_equal(values[~m], 0.0)
  np.testing.assert_array_equal(grad[~m], 0.0)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_vmap_over_batch_equals_batched_call(spec, rng):
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  m = np.array([[True, True, False], [True, False, True]])
  batched, _ = evaluate(spec, zs, ids, lp, temperature=2.0, where=m)
  mapped = _vmapped()(zs, ids, lp, m)[spec[0]]
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


@functools.cache
def _vmapped():
  return jit(lambda zs, ids, lp, m: {sid: jax.vmap(
      lambda a, b, c, w: losses.sparse_divergence(a, b, c, divergence=name, temperature=2.0,
                                                  where=w, **options))(zs, ids, lp, m)
      for sid, name, options in SPECS})


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["f16", "bf16"])
def test_low_precision_storage(dtype, rng):
  """Log-probs stored as float16/bfloat16 and uint16 ids, a bf16 student: float32 results."""
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  ids, lp = teacher_topk(rng, zt, K)
  f = jit(lambda a, b, c: [losses.sparse_divergence(a, b, c, divergence=d, temperature=2.0)
                           for d in ("forward_kl", "generalized_jsd")])
  lp_low = jnp.asarray(lp, dtype)
  zs_low = jnp.asarray(zs, jnp.bfloat16)
  low = f(zs_low, ids.astype(np.uint16), lp_low)
  rounded = f(np.asarray(zs_low, np.float32), ids, np.asarray(lp_low, np.float32))
  exact = f(zs, ids, lp)
  for got, same, near in zip(low, rounded, exact):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, same, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, near, rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------
# Extreme inputs.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", EXTREME_CASES, ids=EXTREME_CASE_IDS)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_banned_tokens_and_extreme_logits(spec, case, rng):
  """Both models ban the same tokens, logits at +-1e4: no NaN, values as the reference.

  The teacher's tail is given exactly (as a cache stores it): at these logits its true mass
  underflows to 0, and ``1 - sum(p_topk)`` would be float32 rounding noise, which reverse KL
  weighs by the student's tail mass.
  """
  _, name, options = spec
  tail, temperature = case
  zs, zt = logits(rng, SHAPE), logits(rng, SHAPE)
  zs[0, 0, :4], zt[0, 0, 4:8] = 1e4, 1e4  # disjoint supports
  zs[0, 1, :], zt[0, 1, 3:] = -1e4, -1e4
  banned = np.zeros(SHAPE, bool)
  banned[0, 2, ::2] = True
  banned[1, 0, 10:] = True
  banned[1, 1, K:] = True  # exactly K allowed tokens: both tails are empty
  banned[1, 2, 1:] = True  # a single allowed token: banned ids in the top-k, at log-prob -inf
  zs[banned] = zt[banned] = -np.inf
  ids, lp = teacher_topk(rng, zt, K)
  inside = np.zeros(SHAPE, bool)
  np.put_along_axis(inside, ids.astype(np.int64), True, -1)
  tail_lp = ref.logsumexp(np.where(inside, -np.inf, ref.log_softmax(zt))).astype(np.float32)
  assert np.isneginf(tail_lp[1, 1:]).all()
  values, grad = evaluate(spec, zs, ids, lp, tail=tail, temperature=temperature,
                          teacher_tail_logprob=tail_lp)
  expected = ref.sparse_divergence(name, zs, ids, lp, tail=tail, temperature=temperature,
                                   teacher_tail_logprob=tail_lp, **options)
  assert np.isfinite(expected).all()
  assert not np.isnan(values).any() and not np.isnan(grad).any()
  # float32 resolves numbers near 1e4 to ~1e-3: log-probs of -1e4 logits carry that error, and
  # renormalising them over the bins (no tail) or weighing large KLs (AKL) keeps it.
  np.testing.assert_allclose(values, expected, rtol=1e-3, atol=2e-3 * temperature ** 2)
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[banned], 0.0)


def test_out_of_range_ids_under_jit_give_nan_not_a_wrong_number(rng):
  zs, zt = logits(rng, (2, 16)), logits(rng, (2, 16))
  ids, lp = teacher_topk(rng, zt, K)
  ids[1, 0] = 99
  got = np.asarray(jit(losses.sparse_divergence)(zs, ids, lp))
  assert np.isfinite(got[0]) and np.isnan(got[1])


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(rng):
  zs = logits(rng, (2, 8))
  ids = np.tile(np.arange(3, dtype=np.int32), (2, 1))
  lp = np.full((2, 3), -1.5, np.float32)
  f = losses.sparse_divergence
  with pytest.raises(ValueError, match=r"teacher_ids contains ids outside the vocabulary \[0, 8\)"):
    f(zs, np.array([[0, 1, 8], [0, 1, 2]]), lp)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    f(zs, np.array([[0, 1, -1], [0, 1, 2]]), lp)
  with pytest.raises(TypeError, match="teacher_ids must be integer token ids"):
    f(zs, ids.astype(np.float32), lp)
  with pytest.raises(ValueError, match=r"teacher_ids shape \(3, 3\) must be student_logits'"):
    f(zs, np.zeros((3, 3), np.int32), lp)
  with pytest.raises(ValueError, match=r"teacher_logprobs shape \(2, 4\) != teacher_ids shape"):
    f(zs, ids, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="top-k size 9 exceeds the student vocabulary 8"):
    f(zs, np.zeros((2, 9), np.int32), np.zeros((2, 9), np.float32))
  with pytest.raises(TypeError, match="teacher_logprobs must be a floating-point array"):
    f(zs, ids, lp.astype(np.int32))
  with pytest.raises(TypeError, match="student_logits must be a floating-point array"):
    f(zs.astype(np.int32), ids, lp)
  with pytest.raises(ValueError, match="where has shape"):
    f(zs, ids, lp, where=np.ones((2, 3), bool))
  with pytest.raises(ValueError, match="teacher_tail_logprob shape"):
    f(zs, ids, lp, teacher_tail_logprob=np.zeros((3,), np.float32))
  for bad_t in (0.0, -2.0):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      f(zs, ids, lp, temperature=bad_t)
  with pytest.raises(ValueError, match="unknown divergence 'jsd'"):
    f(zs, ids, lp, divergence="jsd")
  with pytest.raises(TypeError, match=r"'reverse_kl' takes no option\(s\) \['alpha'\]"):
    f(zs, ids, lp, divergence="reverse_kl", alpha=0.1)
  with pytest.raises(ValueError, match="beta must lie in"):
    f(zs, ids, lp, divergence="generalized_jsd", beta=2.0)
  with pytest.raises(ValueError, match="alpha must lie in"):
    f(zs, ids, lp, divergence="skew_kl", alpha=-0.5)
