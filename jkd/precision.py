"""Mixed-precision matrix products: low-precision operands, float32 accumulation.

:func:`dot` is the one product of jkd's models and fused losses. In ``float32`` it is a plain
``lax.dot_general``. In ``bfloat16`` (or ``float16``) both operands are cast to that dtype, the
products accumulate in float32 (``preferred_element_type``) and the result is cast to
``out_dtype``; the backward pass casts the incoming cotangent to the compute dtype too, so all
three products of a layer (forward, input gradient, weight gradient) run on low-precision
operands with float32 accumulation, and each gradient comes back in its operand's own dtype (a
float32 master weight gets a float32 gradient, never one rounded to bf16).

This is what TPUs and GPUs do inside a bf16 matmul anyway. XLA:CPU is different: a product with
bf16 operands *and* a bf16 result runs at float32 speed, while one with a float32 result uses the
AVX512-BF16 kernels at twice that, and autodiff of a ``preferred_element_type=float32`` product
would hand its transposes a float32 cotangent (float32 speed again). ``bench/train_step.py
--precision bfloat16`` measures the difference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _matrix(a: Array, rows: int) -> Array:
  """``a`` as a matrix: its first ``rows`` axes flattened into one, the rest into the other."""
  return a.reshape(math.prod(a.shape[:rows]), math.prod(a.shape[rows:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _low_precision_dot(x, w, contract, dtype, out_dtype, x_dtype, w_dtype):
  return _fwd(x, w, contract, dtype, out_dtype, x_dtype, w_dtype)[0]


# Every product is a plain 2-D [M, K] x [K, N] one (or with one operand transposed): XLA:CPU's
# fallback dot (taken for other layouts) has no bf16 x bf16 -> f32 kernel.
def _fwd(x, w, contract, dtype, out_dtype, x_dtype, w_dtype):
  del x_dtype, w_dtype
  xc, wc = x.astype(dtype), w.astype(dtype)
  free_x = x.ndim - contract
  y = jnp.dot(_matrix(xc, free_x), _matrix(wc, contract), preferred_element_type=jnp.float32)
  return y.astype(out_dtype).reshape(x.shape[:free_x] + w.shape[contract:]), (xc, wc)


def _bwd(contract, dtype, out_dtype, x_dtype, w_dtype, residuals, g):
  del out_dtype
  xc, wc = residuals
  free_x = xc.ndim - contract
  xm, wm, gm = _matrix(xc, free_x), _matrix(wc, contract), _matrix(g.astype(dtype), free_x)
  dx = lax.dot_general(gm, wm, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = lax.dot_general(xm, gm, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x_dtype).reshape(xc.shape), dw.astype(w_dtype).reshape(wc.shape)


_low_precision_dot.defvjp(_fwd, _bwd)


def _dims(x_ndim: int, contract: int):
  return ((tuple(range(x_ndim - contract, x_ndim)), tuple(range(contract))), ((), ()))


def dot(x: Array, w: Array, *, contract: int = 1, dtype=None, out_dtype=None) -> Array:
  """``x . w``, contracting the last ``contract`` axes of ``x`` with the first of ``w``.

  Args:
    x: ``[..., K1, ..., Kc]`` activations (any float dtype).
    w: ``[K1, ..., Kc, N...]`` weights (any float dtype).
    contract: how many axes are contracted (2 for an attention output projection over
      ``[heads, head_dim]``).
    dtype: compute dtype of the operands; default: the promoted dtype of ``x`` and ``w``.
    out_dtype: dtype of the result; default ``dtype``.

  Returns:
    ``[..., N...]`` in ``out_dtype``. With a ``float32`` compute dtype this is exactly
    ``lax.dot_general`` on float32 operands. With a narrower one, the products accumulate in
    float32 and the gradients are formed from low-precision operands the same way (see the
    module docstring); they come back in the dtypes ``x`` and ``w`` came in.

  >>> dot(jnp.ones((2, 3)), jnp.ones((3, 4)), dtype=jnp.bfloat16, out_dtype=jnp.float32).dtype
  dtype('float32')
  """
  if not 1 <= contract <= min(x.ndim, w.ndim):
    raise ValueError(f"contract={contract} axes do not fit x{list(x.shape)} and w{list(w.shape)}.")
  if x.shape[x.ndim - contract:] != w.shape[:contract]:
    raise ValueError(f"the contracted axes differ: x{list(x.shape)} ends with"
                     f" {list(x.shape[x.ndim - contract:])}, w{list(w.shape)} starts with"
                     f" {list(w.shape[:contract])}.")
  dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(x, w))
  out_dtype = jnp.dtype(out_dtype if out_dtype is not None else dtype)
  if dtype.itemsize >= 4:
    y = lax.dot_general(x.astype(dtype), w.astype(dtype), _dims(x.ndim, contract))
    return y.astype(out_dtype)
  return _low_precision_dot(x, w, contract, dtype, out_dtype, jnp.dtype(x.dtype),
                            jnp.dtype(w.dtype))
