"""Token-level divergences (jkd.losses.divergences) against the float64 NumPy reference."""

from __future__ import annotations

import functools
import math

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

SPECS = ref.SPECS
SPEC_IDS = [s[0] for s in SPECS]
SHAPES = [(13,), (4, 17), (2, 3, 11)]
TEMPERATURES = [1.0, 2.0]


def lib(name, **kwargs):
  """The public function ``name`` under ``jax.jit``, options bound as keywords."""
  return jit(functools.partial(losses.DIVERGENCES[name], **kwargs))


@functools.cache
def _all_specs(temperature: float, masked: bool, with_grad: bool):
  """One jitted function evaluating every spec (and its gradient wrt the student logits).

  Compiling once for all specs, and caching it, keeps the suite fast: the per-spec tests
  below look up their own entry.
  """
  def one(name, options, zs, zt, where):
    f = functools.partial(losses.DIVERGENCES[name], temperature=temperature, where=where,
                          **options)
    if not with_grad:
      return f(zs, zt), None
    (_, values), grad = jax.value_and_grad(
        lambda x: (jnp.sum(f(x, zt)), f(x, zt)), has_aux=True)(zs)
    return values, grad

  def run(zs, zt, where):
    return {sid: one(name, options, zs, zt, where if masked else None)
            for sid, name, options in SPECS}
  return jit(run)


def evaluate(spec, zs, zt, *, temperature=1.0, where=None, with_grad=True):
  """``(values, grad of their sum wrt zs)`` of the library's ``spec``, under ``jax.jit``."""
  fn = _all_specs(float(temperature), where is not None, with_grad)
  values, grad = fn(zs, zt, where)[spec[0]]
  return np.asarray(values), (None if grad is None else np.asarray(grad))


def logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def assert_close(actual, expected, *, rtol=2e-5, atol=2e-6):
  actual = np.asarray(actual)
  assert not np.isnan(actual).any(), f"NaN in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


GRAD_SHAPE = (4, 11)  # one shape for every gradient test: one compilation per temperature


# ----------------------------------------------------------------------------------------------
# Values.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_values_match_reference(spec, temperature, rng):
  _, name, options = spec
  for shape in SHAPES:
    zs, zt = logits(rng, shape), logits(rng, shape)
    expected = ref.full_divergence(name, zs, zt, temperature=temperature, **options)
    got, _ = evaluate(spec, zs, zt, temperature=temperature, with_grad=False)
    assert got.shape == shape[:-1] and got.dtype == np.float32
    assert_close(got, expected, atol=2e-6 * temperature ** 2)


def test_named_functions_equal_full_divergence(rng):
  zs, zt = logits(rng, (3, 11)), logits(rng, (3, 11))

  @jit
  def both(a, b):
    return [(losses.DIVERGENCES[name](a, b, temperature=2.0, **options),
             losses.full_divergence(name, a, b, temperature=2.0, **options))
            for _, name, options in SPECS]
  for named, by_name in both(zs, zt):
    np.testing.assert_array_equal(named, by_name)


def test_zero_on_equal_inputs_and_nonnegative(rng):
  """True divergences: 0 when the distributions are equal, never negative (up to rounding)."""
  for temperature in TEMPERATURES:
    fn = _all_specs(temperature, False, True)
    for _ in range(8):
      zs, zt = logits(rng, GRAD_SHAPE, scale=4.0), logits(rng, GRAD_SHAPE, scale=4.0)
      same, different = fn(zs, zs, None), fn(zs, zt, None)
      for sid, name, _ in SPECS:
        np.testing.assert_allclose(same[sid][0], 0.0, atol=1e-6, err_msg=sid)
        values = np.asarray(different[sid][0])
        assert (values >= -1e-6).all(), sid
        if name == "total_variation":
          assert (values <= temperature ** 2 + 1e-6).all()


def test_endpoint_identities(rng):
  """beta=0/1 of the JSD are forward/reverse KL (TRL); alpha=0 skews and TAID's t=1 too."""
  zs, zt = logits(rng, (5, 12)), logits(rng, (5, 12))
  identities = [
      ("generalized_jsd", {"beta": 0.0}, "forward_kl"),
      ("generalized_jsd", {"beta": 1.0}, "reverse_kl"),
      ("skew_kl", {"alpha": 0.0}, "forward_kl"),
      ("skew_reverse_kl", {"alpha": 0.0}, "reverse_kl"),
      ("taid", {"t": 1.0}, "forward_kl"),
  ]

  @functools.partial(jit, static_argnames="temperature")
  def pairs(a, b, temperature):
    return [(losses.DIVERGENCES[name](a, b, temperature=temperature, **options),
             losses.DIVERGENCES[same](a, b, temperature=temperature))
            for name, options, same in identities]
  for temperature in TEMPERATURES:
    for (name, options, same), (got, want) in zip(identities, pairs(zs, zt, temperature)):
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{name}{options} != {same}")


def test_taid_t_may_be_traced_and_t0_is_zero(rng):
  zs, zt = logits(rng, (3, 12)), logits(rng, (3, 12))
  traced = jit(lambda a, b, t: losses.taid_kl(a, b, t=t, temperature=2.0))
  for t in (0.0, 0.3, 1.0):
    assert_close(traced(zs, zt, jnp.float32(t)),
                 ref.full_divergence("taid", zs, zt, t=t, temperature=2.0), atol=1e-5)
  np.testing.assert_allclose(traced(zs, zt, jnp.float32(0.0)), 0.0, atol=1e-6)


def test_jsd_is_continuous_inside_the_interval(rng):
  """Only the ends are special-cased: beta=1e-3 follows the mixture formula (close to 0)."""
  zs, zt = logits(rng, (4, 10)), logits(rng, (4, 10))
  got = lib("generalized_jsd", beta=1e-3)(zs, zt)
  assert_close(got, ref.full_divergence("generalized_jsd", zs, zt, beta=1e-3), atol=1e-6)


def test_hand_computed_values():
  """Two-token distributions worked out by hand: p = (1/2, 1/2), q = (1/4, 3/4).

  The other 9 tokens of the vocabulary are banned in both models (which must not change the
  numbers), so that the compiled gradient-shape function is reused.
  """
  zt = np.full(GRAD_SHAPE, -np.inf, np.float32)
  zs = np.full(GRAD_SHAPE, -np.inf, np.float32)
  zt[:, :2] = np.log([0.5, 0.5])
  zs[:, :2] = np.log([0.25, 0.75])
  zs[1:, :2] += np.float32([[-3.0], [0.5], [7.0]])  # logits are defined up to a constant
  ln = math.log
  m = (0.375, 0.625)  # (p + q) / 2
  s = (0.275, 0.725)  # 0.1 p + 0.9 q
  r = (0.45 + 0.025, 0.45 + 0.075)  # 0.9 p + 0.1 q
  expected = {
      "forward_kl": 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75),
      "reverse_kl": 0.25 * ln(0.25 / 0.5) + 0.75 * ln(0.75 / 0.5),
      "total_variation": 0.25,
      "jsd_b0.5": 0.5 * (0.5 * ln(0.5 / m[0]) + 0.5 * ln(0.5 / m[1]))
                  + 0.5 * (0.25 * ln(0.25 / m[0]) + 0.75 * ln(0.75 / m[1])),
      "skew_kl": 0.5 * ln(0.5 / s[0]) + 0.5 * ln(0.5 / s[1]),
      "skew_reverse_kl": 0.25 * ln(0.25 / r[0]) + 0.75 * ln(0.75 / r[1]),
  }
  for sid, want in expected.items():
    _, name, options = SPECS[SPEC_IDS.index(sid)]
    np.testing.assert_allclose(ref.full_divergence(name, zs, zt, **options), want, rtol=1e-6)
    np.testing.assert_allclose(evaluate(SPECS[SPEC_IDS.index(sid)], zs, zt)[0], want,
                               rtol=1e-5, err_msg=sid)
    # T = 2 tempers both sides, and multiplies by 4.
    np.testing.assert_allclose(
        evaluate(SPECS[SPEC_IDS.index(sid)], 2 * zs, 2 * zt, temperature=2.0)[0], 4 * want,
        rtol=1e-5, err_msg=sid)


# ----------------------------------------------------------------------------------------------
# Adaptive KL: the head/tail split (docs/methods.md §1.7).
# ----------------------------------------------------------------------------------------------

def test_adaptive_kl_head_crossing_token_ties_and_order():
  # Row 0: teacher [0.1, 0.4, 0.2, 0.3]; sorted, 0.4 + 0.3 reaches mu = 0.5, so the head is
  # tokens {1, 3}. The student differs from the teacher only on tokens 1 and 3: g_t = 0, the
  # loss is pure forward KL. (Applying the sorted-order mask to the unsorted tokens, the
  # reference-code bug, would make the head {0, 1} and the weights 1/2, 1/2.)
  # Row 1: teacher [0.3, 0.3, 0.3, 0.1]: 0.3 + 0.3 crosses mu; the third 0.3 ties with the
  # crossing token, so the head is {0, 1, 2}. The student moves 0.2 from token 2 to token 3:
  # g_h = g_t = 0.2, weights 1/2, 1/2 (without the tie rule the loss would be pure reverse KL).
  zt = np.log(np.array([[0.1, 0.4, 0.2, 0.3], [0.3, 0.3, 0.3, 0.1]], np.float32))
  zs = np.log(np.array([[0.1, 0.1, 0.2, 0.6], [0.3, 0.3, 0.1, 0.3]], np.float32))
  np.testing.assert_array_equal(ref.akl_head(ref.softmax(zt[0]), 0.5), [0, 1, 0, 1])
  np.testing.assert_array_equal(ref.akl_head(ref.softmax(zt[1]), 0.5), [1, 1, 1, 0])
  weights = ref.adaptive_kl_weights(ref.log_softmax(zs), ref.log_softmax(zt), mu=0.5)
  np.testing.assert_allclose(weights, [[1.0, 0.0], [0.5, 0.5]], atol=1e-6)
  fkl = ref.full_divergence("forward_kl", zs, zt)
  rkl = ref.full_divergence("reverse_kl", zs, zt)
  got = lib("adaptive_kl", mu=0.5)(zs, zt)
  assert_close(got, [fkl[0], 0.5 * (fkl[1] + rkl[1])], atol=1e-6)
  assert_close(got, ref.full_divergence("adaptive_kl", zs, zt, mu=0.5), atol=1e-6)


def test_adaptive_kl_mu_one_puts_every_token_in_the_head(rng):
  zs, zt = logits(rng, (6, 9)), logits(rng, (6, 9), scale=1.0)
  # g_t = 0: pure forward KL.
  assert_close(lib("adaptive_kl", mu=1.0)(zs, zt), ref.full_divergence("forward_kl", zs, zt),
               atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------

# beta = 0 and 1 run the forward/reverse KL code (test_endpoint_identities), beta = 0.9 the same
# code as 0.5: leaving them out saves compilations.
GRAD_SPECS = [s for s in SPECS if (s[1] in ref.NO_STOP_GRADIENT or s[0] == "taid_t1")
              and s[0] not in ("jsd_b0", "jsd_b1", "jsd_b0.9")]


@pytest.mark.parametrize("spec", GRAD_SPECS, ids=[s[0] for s in GRAD_SPECS])
def test_check_grads_float64(spec, rng, x64):
  """Autodiff vs finite differences of the library itself, in float64, at T = 1 and 2.

  adaptive_kl and taid (t < 1) hold a stop-gradient (the AKL weights, TAID's student part of
  the target), so their gradient is not the derivative of their value and ``check_grads`` does
  not apply: their gradients are checked against the frozen reference below.
  """
  _, name, options = spec
  zs = jnp.asarray(rng.standard_normal((3, 11)) * 2.0)
  zt = jnp.asarray(rng.standard_normal((3, 11)) * 2.0)
  f = jax.jit(lambda x: jnp.stack([  # check_grads nests it: no compiler options
      losses.DIVERGENCES[name](x, zt, temperature=t, **options) for t in TEMPERATURES]))
  assert f(zs).dtype == jnp.float64
  check_grads(f, (zs,), order=1, modes=["rev"])


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_grad_matches_reference_finite_differences(spec, temperature, rng):
  """Gradient wrt student logits vs central differences of the float64 reference.

  For adaptive_kl the head/tail weights, for taid the target, are frozen at the evaluation
  point in the reference: that is what the stop-gradient means.
  """
  _, name, options = spec
  zs, zt = logits(rng, GRAD_SHAPE, scale=2.0), logits(rng, GRAD_SHAPE, scale=2.0)
  frozen = ref.frozen_options(name, zs, zt, temperature=temperature, **options)
  expected = ref.numerical_grad(
      lambda x: ref.full_divergence(name, x, zt, temperature=temperature, **frozen), zs)
  _, grad = evaluate(spec, zs, zt, temperature=temperature)
  assert_close(grad, expected, rtol=1e-4, atol=2e-6 * temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_grad_analytic(temperature, rng):
  """Closed forms, with s = zs / T and the T**2 factor: d/dzs = T * d/ds.

  forward KL: T (q - p); reverse KL: T q (log q - log p - KL(q||p));
  total variation: -T/2 q (sign(p - q) - sum_v q_v sign(p_v - q_v));
  taid: T (q - p_t) with p_t a constant.
  """
  zs, zt = logits(rng, GRAD_SHAPE, scale=2.0), logits(rng, GRAD_SHAPE, scale=2.0)
  lq, lp = ref.log_softmax(zs, temperature), ref.log_softmax(zt, temperature)
  q, p = np.exp(lq), np.exp(lp)
  t = temperature
  sign = np.sign(p - q)
  target = np.exp(ref.taid_target_from_logits(zs, zt, t=0.4, temperature=temperature))
  expected = {
      "forward_kl": t * (q - p),
      "reverse_kl": t * q * (lq - lp - ref.kl(lq, lp)[..., None]),
      "total_variation": -0.5 * t * q * (sign - np.sum(q * sign, -1, keepdims=True)),
      "taid_t0.4": t * (q - target),
  }
  for sid, want in expected.items():
    _, grad = evaluate(SPECS[SPEC_IDS.index(sid)], zs, zt, temperature=temperature)
    assert_close(grad, want, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_mask_equivalence(spec, rng):
  zs, zt = logits(rng, (2, 5, 11)), logits(rng, (2, 5, 11))
  m = np.zeros(10, bool)
  m[rng.permutation(10)[:6]] = True  # a fixed count keeps f(x[m]) at one shape
  m = m.reshape(2, 5)
  masked, grad = evaluate(spec, zs, zt, temperature=2.0, where=m)
  unmasked, _ = evaluate(spec, zs[m], zt[m], temperature=2.0, with_grad=False)
  np.testing.assert_allclose(masked[m], unmasked, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(masked[~m], 0.0)
  np.testing.assert_array_equal(grad[~m], 0.0)  # masked positions receive no gradient


def test_integer_masks_are_accepted_as_booleans(rng):
  zs, zt = logits(rng, (2, 5, 11)), logits(rng, (2, 5, 11))
  m = rng.random((2, 5)) < 0.5
  f = lib("forward_kl")
  np.testing.assert_array_equal(f(zs, zt, where=m.astype(np.int32)), f(zs, zt, where=m))


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_masked_positions_with_infinite_values_leak_no_nan(spec, rng):
  """Padding rows may hold anything, e.g. a teacher banning what the student keeps: the mask
  must stop their infinities from turning into NaN gradients (the double-where rule)."""
  zs, zt = logits(rng, GRAD_SHAPE), logits(rng, GRAD_SHAPE)
  zs[2:, :4] = -np.inf  # student bans tokens the teacher keeps: FKL = inf
  zt[3, 4:] = -np.inf   # the teacher bans tokens the student keeps: RKL = inf
  m = np.array([True, True, False, False])
  values, grad = evaluate(spec, zs, zt, where=m)
  assert not np.isnan(values).any() and not np.isnan(grad).any()
  np.testing.assert_array_equal(values[~m], 0.0)
  np.testing.assert_array_equal(grad[~m], 0.0)


# ----------------------------------------------------------------------------------------------
# Extreme logits.
# ----------------------------------------------------------------------------------------------

def _check_extreme(spec, zs, zt, temperature):
  _, name, options = spec
  expected = ref.full_divergence(name, zs, zt, temperature=temperature, **options)
  values, grad = evaluate(spec, zs, zt, temperature=temperature)
  assert not np.isnan(values).any(), f"NaN values {values}"
  # inf only where the divergence is mathematically infinite, and there it is +inf.
  np.testing.assert_array_equal(np.isinf(values), np.isinf(expected))
  assert (values[np.isinf(values)] > 0).all()
  np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4 * temperature ** 2)
  # No NaN (nor inf) in the gradient of any position whose value is finite.
  finite = np.isfinite(expected)
  assert np.isfinite(grad[finite]).all(), f"non-finite gradient {grad}"
  return values, grad


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_extreme_logits_plus_minus_1e4(spec, temperature, rng):
  zs, zt = logits(rng, GRAD_SHAPE), logits(rng, GRAD_SHAPE)
  for z in (zs, zt):
    z[rng.random(z.shape) < 0.25] = 1e4
    z[rng.random(z.shape) < 0.25] = -1e4
  zs[0, :], zt[0, :] = 1e4, -1e4  # whole rows at one extreme
  zs[1, :3], zt[1, -3:] = 1e4, 1e4  # disjoint supports, each at +1e4
  values, _ = _check_extreme(spec, zs, zt, temperature)
  assert np.isfinite(values).all()


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_banned_tokens_in_both_models(spec, temperature, rng):
  zs, zt = logits(rng, GRAD_SHAPE), logits(rng, GRAD_SHAPE)
  banned = rng.random(GRAD_SHAPE) < 0.3
  banned[:, 0] = False
  banned[1, 1:] = True  # a row with a single allowed token
  zs[2, 5:], zt[2, 5:] = 1e4, -1e4  # mixed with extremes
  zs[banned] = zt[banned] = -np.inf
  values, grad = _check_extreme(spec, zs, zt, temperature)
  assert np.isfinite(values).all()
  np.testing.assert_array_equal(grad[banned], 0.0)


def _infinite_when(name, options, side):
  """Whether the divergence is +inf when only ``side`` ('teacher'/'student') bans tokens."""
  if side == "teacher":  # q > 0 = p somewhere: anything with KL(q || p) in it
    return (name in ("reverse_kl", "adaptive_kl", "balanced_kl")
            or (name == "generalized_jsd" and options["beta"] == 1.0))
  return (name in ("forward_kl", "adaptive_kl", "balanced_kl")  # p > 0 = q: KL(p || q)
          or (name == "generalized_jsd" and options["beta"] == 0.0)
          or (name == "taid" and options["t"] == 1.0))


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_one_model_bans_tokens_the_other_keeps(spec, side, rng):
  """Forward KL stays finite when the teacher bans tokens; reverse KL is +inf there, not NaN
  (and conversely when the student bans them)."""
  _, name, options = spec
  zs, zt = logits(rng, GRAD_SHAPE), logits(rng, GRAD_SHAPE)
  z = zt if side == "teacher" else zs
  z[:, 7:] = -np.inf
  z[0, 1:] = -np.inf
  values, _ = _check_extreme(spec, zs, zt, 1.0)
  if _infinite_when(name, options, side):
    assert np.isinf(values).all()
  else:
    assert np.isfinite(values).all()


# ----------------------------------------------------------------------------------------------
# Dtypes, vmap.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_bf16_inputs_compute_in_float32(spec, rng):
  shape = SHAPES[-1]
  zs, zt = logits(rng, shape), logits(rng, shape)
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  for temperature in TEMPERATURES:
    got, _ = evaluate(spec, zs16, zt16, temperature=temperature, with_grad=False)
    assert got.dtype == np.float32
    # Exactly the float32 computation on the bf16-rounded values...
    rounded, _ = evaluate(spec, np.asarray(zs16, np.float32), np.asarray(zt16, np.float32),
                          temperature=temperature, with_grad=False)
    np.testing.assert_allclose(got, rounded, rtol=1e-6, atol=1e-7)
    # ...and close to the float32-input result (bf16 keeps 8 bits of the logits).
    full, _ = evaluate(spec, zs, zt, temperature=temperature, with_grad=False)
    np.testing.assert_allclose(got, full, rtol=5e-2, atol=5e-2 * temperature ** 2)


def test_mixed_precision_inputs(rng):
  zs, zt = logits(rng, (3, 11)), logits(rng, (3, 11))
  got = lib("generalized_jsd")(jnp.asarray(zs, jnp.bfloat16), zt)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, lib("generalized_jsd")(zs, zt), rtol=5e-2, atol=5e-3)


@functools.cache
def _vmapped_all_specs():
  def run(zs, zt, where):
    return {sid: jax.vmap(lambda a, b, w: losses.DIVERGENCES[name](
        a, b, temperature=2.0, where=w, **options))(zs, zt, where)
            for sid, name, options in SPECS}
  return jit(run)


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_vmap_over_batch_equals_batched_call(spec, rng):
  zs, zt = logits(rng, (2, 5, 11)), logits(rng, (2, 5, 11))
  m = rng.random((2, 5)) < 0.7
  batched, _ = evaluate(spec, zs, zt, temperature=2.0, where=m)
  mapped = _vmapped_all_specs()(zs, zt, m)[spec[0]]
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

Z = np.zeros((3, 11), np.float32)


@pytest.mark.parametrize("name", sorted(losses.DIVERGENCES))
def test_bad_inputs_raise_clear_errors(name):
  options = {"t": 0.5} if name == "taid" else {}
  f = functools.partial(losses.DIVERGENCES[name], **options)
  with pytest.raises(ValueError, match="teacher vocab 12 != student vocab 11"):
    f(Z, np.zeros((3, 12), np.float32))
  with pytest.raises(ValueError, match="teacher vocab 12 != student vocab 11"):
    jit(f)(Z, np.zeros((3, 12), np.float32))  # at trace time, too
  with pytest.raises(ValueError, match=r"shape \(3, 11\) != teacher_logits shape \(4, 11\)"):
    f(Z, np.zeros((4, 11), np.float32))
  with pytest.raises(ValueError, match=r"where has shape \(3, 11\) but must have shape \(3,\)"):
    f(Z, Z, where=np.ones((3, 11), bool))
  with pytest.raises(TypeError, match="where must be a boolean mask"):
    f(Z, Z, where=np.ones((3,), np.float32))
  with pytest.raises(TypeError, match="student_logits must be a floating-point array"):
    f(Z.astype(np.int32), Z)
  with pytest.raises(TypeError, match="teacher_logits must be a floating-point array"):
    f(Z, Z.astype(np.int32))
  with pytest.raises(ValueError, match="vocabulary axis"):
    f(np.float32(1.0), np.float32(1.0))
  for bad_t in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      f(Z, Z, temperature=bad_t)
  with pytest.raises(TypeError, match="temperature must be a Python number"):
    f(Z, Z, temperature=jnp.float32(2.0))
  with pytest.raises(TypeError, match="positional"):
    losses.DIVERGENCES[name](Z, Z, 2.0)


@pytest.mark.parametrize("name,option", [
    ("generalized_jsd", "beta"), ("skew_kl", "alpha"), ("skew_reverse_kl", "alpha"),
    ("adaptive_kl", "mu"), ("taid", "t")])
def test_option_ranges(name, option):
  f = losses.DIVERGENCES[name]
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=f"{option} must lie in"):
      f(Z, Z, **{option: bad})
  with pytest.raises(TypeError, match=f"{option} must be a Python number"):
    f(Z, Z, **{option: "0.5"})
  if name == "adaptive_kl":
    with pytest.raises(ValueError, match=r"mu must lie in \(0, 1\]"):
      f(Z, Z, mu=0.0)
  if name == "taid":
    with pytest.raises(ValueError, match="must be a scalar"):
      f(Z, Z, t=jnp.ones((2,)))


def test_unknown_divergence_and_option():
  with pytest.raises(ValueError,
                     match=r"unknown divergence 'forward_kll'.*did you mean 'forward_kl'"):
    losses.full_divergence("forward_kll", Z, Z)
  with pytest.raises(ValueError, match="unknown divergence"):
    losses.full_divergence(None, Z, Z)
  with pytest.raises(TypeError, match=r"'forward_kl' takes no option\(s\) \['beta'\]"):
    losses.full_divergence("forward_kl", Z, Z, beta=0.5)
  with pytest.raises(TypeError, match=r"'skew_kl' takes no option\(s\) \['beta'\]"):
    losses.full_divergence("skew_kl", Z, Z, beta=0.5)
  with pytest.raises(TypeError, match="needs the option 't'"):
    losses.full_divergence("taid", Z, Z)
  with pytest.raises(TypeError, match="unexpected keyword"):
    losses.forward_kl(Z, Z, beta=0.5)


@pytest.mark.parametrize("name, options", [("forward_kl", {}), ("reverse_kl", {}),
                                           ("generalized_jsd", {"beta": 0.5}),
                                           ("generalized_jsd", {"beta": 0.9})])
def test_closed_form_gradients_equal_autodiff_of_the_core(name, options, rng):
  """The closed-form gradients (:data:`CLOSED_FORM`) with respect to both models' logits equal
  the autodiff of the plain core, banned tokens (-inf where the other model keeps them: the
  values are infinite there) included."""
  zs = rng.normal(size=(5, 11)).astype(np.float32) * 2
  zt = rng.normal(size=(5, 11)).astype(np.float32) * 2
  zs[0, :3] = -np.inf  # banned by the student only (infinite forward KL)
  zt[1, 3:5] = -np.inf  # by the teacher only (infinite reverse KL)
  zs[2, 5:7] = zt[2, 5:7] = -np.inf  # by both
  weights = rng.uniform(size=5).astype(np.float32)

  def closed(zs, zt):
    return jnp.sum(weights * losses.divergences.divergence_values(
        name, zs, zt, temperature=1.5, options=options))

  def core(zs, zt):
    log_q = jax.nn.log_softmax(zs / 1.5, axis=-1)
    log_p = jax.nn.log_softmax(zt / 1.5, axis=-1)
    return jnp.sum(weights * losses.divergences.CORES[name](log_q, log_p, **options) * 2.25)

  rows = slice(2, 5) if name != "generalized_jsd" else slice(0, 5)  # finite-valued rows
  zs, zt = jnp.asarray(zs[rows]), jnp.asarray(zt[rows])
  weights = weights[rows]
  v1, (gs1, gt1) = jax.jit(jax.value_and_grad(closed, argnums=(0, 1)))(zs, zt)
  v2, (gs2, gt2) = jax.jit(jax.value_and_grad(core, argnums=(0, 1)))(zs, zt)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for got, want in ((gs1, gs2), (gt1, gt2)):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
