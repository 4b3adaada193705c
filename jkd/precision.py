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

What is kept on every backend, and what on XLA:CPU alone (:func:`jkd.runtime.xla_cpu`, at trace
time):

* the custom gradient (low-precision operands in all three products, float32 accumulation,
  each gradient in its operand's dtype) runs everywhere: with autodiff's float32 cotangent a
  GPU or TPU would also run the two backward products on float32 operands, at a fraction of its
  bf16 rate (as PyTorch's autocast does, the backward stays in bf16);
* each product is flattened to a plain 2-D ``[M, K] x [K, N]`` one on XLA:CPU only, whose
  fallback dot (taken for other layouts) has no bf16 x bf16 -> f32 kernel. GPUs and TPUs contract
  several axes natively, and on a TPU a reshape that merges tiled axes (``[heads, head_dim]``)
  would cost a relayout copy: there the products are ``dot_general`` over the original axes.
  Both forms give the same numbers, up to the order of the float32 sums.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jkd import runtime

Array = jax.Array


def _matrix(a: Array, rows: int) -> Array:
  """``a`` as a matrix: its first ``rows`` axes flattened into one, the rest into the other."""
  return a.reshape(math.prod(a.shape[:rows]), math.prod(a.shape[rows:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _low_precision_dot(x, w, contract, dtype, out_dtype, x_dtype, w_dtype, flat):
  return _fwd(x, w, contract, dtype, out_dtype, x_dtype, w_dtype, flat)[0]


# flat (XLA:CPU): every product is a plain 2-D [M, K] x [K, N] one (or with one operand
# transposed), since XLA:CPU's fallback dot (taken for other layouts) has no bf16 x bf16 -> f32
# kernel. Otherwise each is a dot_general over the operands' own axes.
def _fwd(x, w, contract, dtype, out_dtype, x_dtype, w_dtype, flat):
  del x_dtype, w_dtype
  xc, wc = x.astype(dtype), w.astype(dtype)
  free_x = x.ndim - contract
  if flat:
    y = jnp.dot(_matrix(xc, free_x), _matrix(wc, contract), preferred_element_type=jnp.float32)
    y = y.reshape(x.shape[:free_x] + w.shape[contract:])
  else:
    y = lax.dot_general(xc, wc, _dims(x.ndim, contract), preferred_element_type=jnp.float32)
  return y.astype(out_dtype), (xc, wc)


def _bwd(contract, dtype, out_dtype, x_dtype, w_dtype, flat, residuals, g):
  del out_dtype
  xc, wc = residuals
  free_x = xc.ndim - contract
  g = g.astype(dtype)
  if flat:
    xm, wm, gm = _matrix(xc, free_x), _matrix(wc, contract), _matrix(g, free_x)
    dx = lax.dot_general(gm, wm, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = lax.dot_general(xm, gm, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  else:  # g: [F..., N...]; x: [F..., K...]; w: [K..., N...].
    free_w = tuple(range(contract, wc.ndim))
    g_out = tuple(range(free_x, g.ndim))
    dx = lax.dot_general(g, wc, ((g_out, free_w), ((), ())), preferred_element_type=jnp.float32)
    dw = lax.dot_general(xc, g, ((tuple(range(free_x)),) * 2, ((), ())),
                         preferred_element_type=jnp.float32)
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
                            jnp.dtype(w.dtype), runtime.xla_cpu())
