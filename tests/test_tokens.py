"""Token log-probs, cross-entropy and the masked reductions (jkd.losses.tokens)."""

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

IGNORE = losses.IGNORE_INDEX
SHAPES = [(6, 11), (2, 5, 11)]  # [tokens, vocab] and [batch, seq, vocab]


def logits(rng, shape, scale=3.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def labels_for(rng, shape, *, ignore_index=IGNORE):
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels.reshape(-1)[:2] = ignore_index
  return labels


def assert_close(actual, expected, *, rtol=1e-5, atol=1e-6):
  actual = np.asarray(actual)
  assert not np.isnan(actual).any(), f"NaN in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@functools.partial(jit, static_argnames=("temperature", "ignore_index"))
def _token_losses(z, labels, where, *, temperature=1.0, ignore_index=IGNORE):
  """Every per-token function of the module, with and without the mask."""
  out = {}
  for w_name, w in (("", None), ("masked", where)):
    out[f"logprobs{w_name}"] = losses.token_logprobs(z, labels, temperature=temperature,
                                                     ignore_index=ignore_index, where=w)
    for e in (0.0, 0.1):
      out[f"ce{e}{w_name}"] = losses.cross_entropy(z, labels, ignore_index=ignore_index,
                                                   where=w, label_smoothing=e)
  return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_values_match_reference(shape, temperature, rng):
  z, labels = logits(rng, shape), labels_for(rng, shape)
  where = rng.random(shape[:-1]) < 0.7
  out = _token_losses(z, labels, where, temperature=temperature)
  for w_name, w in (("", None), ("masked", where)):
    got = out[f"logprobs{w_name}"]
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    assert_close(got, ref.token_logprobs(z, labels, temperature=temperature, where=w))
    for e in (0.0, 0.1):
      assert_close(out[f"ce{e}{w_name}"],
                   ref.cross_entropy(z, labels, where=w, label_smoothing=e))


def test_custom_ignore_index(rng):
  z = logits(rng, (6, 11))
  labels = labels_for(rng, (6, 11), ignore_index=-1)
  out = _token_losses(z, labels, np.ones(6, bool), ignore_index=-1)
  assert_close(out["ce0.0"], ref.cross_entropy(z, labels, ignore_index=-1))
  assert_close(out["ce0.1"], ref.cross_entropy(z, labels, ignore_index=-1, label_smoothing=0.1))
  np.testing.assert_array_equal(np.asarray(out["logprobs"])[:2], 0.0)


def test_label_mask():
  labels = np.array([[1, IGNORE, 3], [IGNORE, 0, 2]])
  where = np.array([[True, True, False], [True, True, True]])
  np.testing.assert_array_equal(losses.label_mask(labels), labels != IGNORE)
  np.testing.assert_array_equal(losses.label_mask(labels, where=where),
                                (labels != IGNORE) & where)
  np.testing.assert_array_equal(losses.label_mask(labels, ignore_index=3), labels != 3)


# ----------------------------------------------------------------------------------------------
# Reductions.
# ----------------------------------------------------------------------------------------------

def test_reductions_match_reference(rng):
  values = rng.standard_normal((3, 6)).astype(np.float32)
  where = rng.random((3, 6)) < 0.6
  where[2] = False  # an empty sequence: its mean is 0, not NaN

  @jit
  def run(v, w):
    return (losses.masked_mean(v, w), losses.masked_mean(v), losses.sequence_sum(v, w),
            losses.sequence_sum(v), losses.sequence_mean(v, w), losses.sequence_mean(v))

  mm, mm_all, ss, ss_all, sm, sm_all = run(values, where)
  assert_close(mm, ref.masked_mean(values, where))
  assert_close(mm_all, ref.masked_mean(values))
  assert_close(ss, ref.sequence_sum(values, where))
  assert_close(ss_all, ref.sequence_sum(values))
  assert_close(sm, ref.sequence_mean(values, where))
  assert_close(sm_all, ref.sequence_mean(values))
  assert float(sm[2]) == 0.0
  assert float(jit(losses.masked_mean)(values, np.zeros_like(where))) == 0.0
  # Padding does not dilute the mean: masked positions may hold anything, even inf.
  polluted = np.where(where, values, np.inf).astype(np.float32)
  assert_close(jit(losses.masked_mean)(polluted, where), ref.masked_mean(values, where))
  # The gradient of the masked mean is where / count.
  grad = jit(jax.grad(losses.masked_mean))(values, where)
  assert_close(grad, where / where.sum())


def test_reductions_dtypes():
  v16 = jnp.ones((2, 3), jnp.bfloat16)
  assert losses.masked_mean(v16).dtype == jnp.float32
  assert losses.sequence_sum(v16).dtype == jnp.float32
  assert losses.sequence_mean(v16).dtype == jnp.float32
  with pytest.raises(ValueError, match=r"where has shape \(3,\) but must have shape \(2, 3\)"):
    losses.masked_mean(v16, np.ones(3, bool))
  with pytest.raises(ValueError, match="where has shape"):
    losses.sequence_mean(v16, np.ones((3, 2), bool))


# ----------------------------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------------------------

def test_check_grads_float64(rng, x64):
  labels = labels_for(rng, (4, 9))
  z = jnp.asarray(rng.standard_normal((4, 9)) * 2.0)
  f = jax.jit(lambda x: jnp.stack([  # check_grads nests it: no compiler options
      losses.cross_entropy(x, labels), losses.cross_entropy(x, labels, label_smoothing=0.2),
      losses.token_logprobs(x, labels, temperature=2.0)]))
  assert f(z).dtype == jnp.float64
  check_grads(f, (z,), order=1, modes=["rev"])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_grad_is_softmax_minus_target(smoothing, rng):
  """d CE / dz = q - y with y the (smoothed) one-hot target; 0 at ignored positions."""
  z, labels = logits(rng, (2, 5, 11)), labels_for(rng, (2, 5, 11))
  grad = jit(jax.grad(lambda x: jnp.sum(losses.cross_entropy(
      x, labels, label_smoothing=smoothing))))(z)
  target = np.full(z.shape, smoothing / z.shape[-1])
  safe = np.where(labels == IGNORE, 0, labels)
  np.put_along_axis(target, safe[..., None], 1.0 - smoothing + smoothing / z.shape[-1], -1)
  expected = np.where((labels != IGNORE)[..., None], ref.softmax(z) - target, 0.0)
  assert_close(grad, expected, atol=1e-6)
  # And central differences of the float64 reference.
  numeric = ref.numerical_grad(
      lambda x: ref.cross_entropy(x, labels, label_smoothing=smoothing), z)
  assert_close(grad, numeric, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Masks, extremes, dtypes.
# ----------------------------------------------------------------------------------------------

def test_mask_equivalence(rng):
  z, labels = logits(rng, (2, 5, 11)), labels_for(rng, (2, 5, 11))
  m = rng.random((2, 5)) < 0.6
  m[1, 1] = True
  f = jit(lambda x, y, w: [losses.cross_entropy(x, y, where=w, label_smoothing=0.1),
                           losses.token_logprobs(x, y, temperature=2.0, where=w)])
  g = jit(lambda x, y: [losses.cross_entropy(x, y, label_smoothing=0.1),
                        losses.token_logprobs(x, y, temperature=2.0)])
  for masked, unmasked in zip(f(z, labels, m), g(z[m], labels[m])):
    np.testing.assert_allclose(np.asarray(masked)[m], unmasked, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(masked)[~m], 0.0)


def test_extreme_and_banned_logits(rng):
  z = logits(rng, (6, 11))
  z[0, :] = 1e4
  z[1, ::2] = -1e4
  z[2, 3:] = -np.inf  # banned tokens, label allowed
  z[3, 3:] = -np.inf  # label on a banned token: -log 0 = +inf, not NaN
  z[4, :] = -np.inf   # an ignored position holding garbage
  labels = np.array([5, 1, 2, 7, IGNORE, 0], np.int32)
  for e in (0.0, 0.1):
    values = np.asarray(jit(functools.partial(
        losses.cross_entropy, labels=labels, label_smoothing=e))(z))
    expected = ref.cross_entropy(z, labels, label_smoothing=e)
    assert not np.isnan(values).any()
    np.testing.assert_array_equal(np.isinf(values), np.isinf(expected))
    # Smoothing puts target mass on every token: banned ones make it infinite.
    assert np.isinf(values[3]) and (np.isinf(values[2]) == (e > 0))
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-3)
  finite_rows = [0, 1, 2, 4, 5]
  grad = jit(jax.grad(lambda x: jnp.sum(losses.cross_entropy(
      x[np.array(finite_rows)], labels[np.array(finite_rows)]))))(z)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad)[4], 0.0)
  logp = jit(lambda x: losses.token_logprobs(x, labels))(z)
  assert_close(np.asarray(logp)[[0, 1, 2, 5]],
               ref.token_logprobs(z, labels)[[0, 1, 2, 5]], atol=1e-3)
  assert np.isneginf(np.asarray(logp)[3])


def test_bf16_logits(rng):
  z, labels = logits(rng, (2, 5, 11)), labels_for(rng, (2, 5, 11))
  f = jit(lambda x: losses.cross_entropy(x, labels, label_smoothing=0.1))
  z16 = jnp.asarray(z, jnp.bfloat16)
  got = f(z16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, f(np.asarray(z16, np.float32)), rtol=1e-6)
  np.testing.assert_allclose(got, f(z), rtol=5e-2, atol=5e-2)


def test_out_of_range_labels_under_jit_give_nan_not_a_wrong_number(rng):
  z = logits(rng, (3, 11))
  got = np.asarray(jit(losses.token_logprobs)(z, np.array([1, 11, IGNORE])))
  assert np.isfinite(got[0]) and np.isnan(got[1]) and got[2] == 0.0


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(rng):
  z = logits(rng, (3, 11))
  for f in (losses.token_logprobs, losses.cross_entropy):
    with pytest.raises(ValueError, match=r"labels contains ids outside the vocabulary \[0, 11\)"
                       r".*\[11\]"):
      f(z, np.array([1, 11, 2]))
    with pytest.raises(ValueError, match=r"outside the vocabulary.*ignore_index=-100"):
      f(z, np.array([1, -1, 2]))
    with pytest.raises(TypeError, match="labels must be integer token ids"):
      f(z, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"labels shape \(2,\) must equal logits shape"):
      f(z, np.array([1, 2]))
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
      f(z.astype(np.int32), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="where has shape"):
      f(z, np.array([1, 2, 3]), where=np.ones((3, 11), bool))
  for bad in (1.0, -0.1, 2.0):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
      losses.cross_entropy(z, np.array([1, 2, 3]), label_smoothing=bad)
  for bad_t in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      losses.token_logprobs(z, np.array([1, 2, 3]), temperature=bad_t)
