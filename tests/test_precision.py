"""jkd.precision.dot against float64 NumPy products of the rounded operands."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jkd import precision
from jkd.models import transformer


def _bf16(x):
  """x rounded to bfloat16, as float64."""
  return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("contract", [1, 2])
def test_float32_is_plain_dot_general(rng, contract):
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  w = rng.standard_normal((4, 5, 6) if contract == 2 else (5, 6)).astype(np.float32)
  got = jax.jit(lambda a, b: precision.dot(a, b, contract=contract))(x, w)
  dims = (((2, 3), (0, 1)) if contract == 2 else ((3,), (0,)), ((), ()))
  want = jax.jit(lambda a, b: lax.dot_general(a, b, dims))(x, w)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.float32


@pytest.mark.parametrize("contract", [1, 2])
def test_bfloat16_products_and_gradients(rng, contract):
  """bf16 operands, float32 accumulation; gradients from a bf16 cotangent, in the input dtypes."""
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  wshape = (4, 5, 6) if contract == 2 else (5, 6)
  w = rng.standard_normal(wshape).astype(np.float32)
  g = rng.standard_normal((2, 3, 6) if contract == 2 else (2, 3, 4, 6)).astype(np.float32)

  def f(a, b):
    return precision.dot(a, b, contract=contract, dtype=jnp.bfloat16, out_dtype=jnp.float32)

  y, vjp = jax.vjp(jax.jit(f), x, w)
  dx, dw = jax.jit(vjp)(jnp.asarray(g))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
  k = int(np.prod(wshape[:contract]))
  xm, wm = _bf16(x).reshape(-1, k), _bf16(w).reshape(k, -1)
  gm = _bf16(g).reshape(xm.shape[0], -1)
  np.testing.assert_allclose(y, (xm @ wm).reshape(y.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, (gm @ wm.T).reshape(x.shape), rtol=1e-5, atol=1e-5)
  # A float32 weight gets its gradient in float32, not rounded through bf16 (that would miss
  # this tolerance by orders of magnitude).
  np.testing.assert_allclose(dw, (xm.T @ gm).reshape(w.shape), rtol=1e-5, atol=1e-5)
  # bf16 inputs: bf16 result by default and bf16 gradients.
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  yb, vjp_b = jax.vjp(lambda a, b: precision.dot(a, b, contract=contract), xb, wb)
  assert yb.dtype == jnp.bfloat16
  assert [t.dtype for t in vjp_b(yb)] == [jnp.bfloat16, jnp.bfloat16]
  np.testing.assert_allclose(np.asarray(yb, np.float64), _bf16((xm @ wm).reshape(y.shape)),
                             rtol=1e-2)


def test_gradients_through_jit_scan_and_a_transposed_operand(rng):
  """A tied head (the embedding's transpose), inside a scan, as the models use it."""
  h = jnp.asarray(rng.standard_normal((3, 4, 8)), jnp.bfloat16)
  emb = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)

  def loss(e):
    def body(c, x):
      return c + jnp.sum(precision.dot(x, e.T, dtype=jnp.bfloat16, out_dtype=jnp.float32) ** 2), ()
    return jax.lax.scan(body, 0.0, h)[0]

  got = jax.jit(jax.grad(loss))(emb)
  hm, em = _bf16(h).reshape(-1, 8), _bf16(emb)
  want = 2 * ((hm @ em.T)).T @ hm  # d/dE sum((h E^T)^2) = 2 (h E^T)^T h
  # The cotangent 2 (h E^T) is rounded to bf16 before the product: a bf16-sized tolerance.
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


def test_bad_shapes_name_the_axes():
  with pytest.raises(ValueError, match="contracted axes differ"):
    precision.dot(jnp.ones((2, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="contract=3 axes do not fit"):
    precision.dot(jnp.ones((2, 3)), jnp.ones((3, 5)), contract=3)


@pytest.mark.parametrize("features,contract,bias", [((4, 3), 1, True), ((6,), 2, False)])
def test_dense_has_dense_general_parameters_and_outputs(rng, features, contract, bias):
  """Checkpoints stay compatible: same names, shapes and initial values as nn.DenseGeneral."""
  x = jnp.asarray(rng.standard_normal((2, 5, 4, 3) if contract == 2 else (2, 5, 8)),
                  jnp.float32)
  axes = ("a", "b", "c")
  ours = transformer.Dense(features, axes, jnp.float32, jnp.float32, contract=contract,
                           use_bias=bias)
  theirs = nn.DenseGeneral(features, axis=tuple(range(-contract, 0)), use_bias=bias,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                    axes),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  axes[contract:]))
  p_ours = ours.init(jax.random.key(3), x)
  p_theirs = theirs.init(jax.random.key(3), x)
  assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(p_ours), nn.unbox(p_theirs))
  np.testing.assert_array_equal(ours.apply(p_ours, x), theirs.apply(p_theirs, x))
  assert nn.get_partition_spec(p_ours) == nn.get_partition_spec(p_theirs)


def test_bfloat16_model_gradients_follow_float32(rng):
  """A bf16-compute decoder (float32 parameters): float32 gradients close to the f32 model's."""
  from jkd import models  # noqa: PLC0415
  cfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                           num_heads=4, num_kv_heads=2)
  params = models.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(models.apply(p, tokens, config=c).logits)[..., 0])

  g32 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
  g16 = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg.replace(dtype="bfloat16"))
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6
