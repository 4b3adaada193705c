"""Shared validation and numerics for jkd.losses (private).

Every public loss validates its static inputs (shapes, dtypes, option ranges) eagerly, in Python,
so that a mistake is a clear ``ValueError``/``TypeError`` at trace time, never a silent NaN.
Values that only exist at run time (token ids under ``jax.jit``) are checked when they are
concrete; under tracing an out-of-range id yields NaN for that position instead of a wrong number.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def check_float_array(x: Any, name: str) -> Array:
  """Returns ``x`` as a JAX array, raising ``TypeError`` if it is not floating point."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array (got dtype {dtype}); logits and hidden states"
        f" are floats: cast with {name}.astype(jnp.float32) if you meant it.")
  return jnp.asarray(x)


def check_logits_pair(student_logits: Any, teacher_logits: Any) -> tuple[Array, Array]:
  """Validates a student/teacher logits pair: float dtypes, same shape, same vocabulary."""
  zs = check_float_array(student_logits, "student_logits")
  zt = check_float_array(teacher_logits, "teacher_logits")
  if zs.ndim == 0:
    raise ValueError("student_logits must have a vocabulary axis: expected shape [..., vocab].")
  if zs.shape[-1] != zt.shape[-1]:
    raise ValueError(
        f"teacher vocab {zt.shape[-1]} != student vocab {zs.shape[-1]}: the two models must"
        " share one tokenizer for token-level distillation. Map the teacher vocabulary onto the"
        " student's, or configure a cross-tokenizer objective.")
  if zs.shape != zt.shape:
    raise ValueError(
        f"student_logits shape {zs.shape} != teacher_logits shape {zt.shape}: both must be"
        " [..., vocab] over the same positions.")
  return zs, zt


def check_where(where: Any, shape: tuple[int, ...], name: str = "where") -> Array | None:
  """Validates a boolean mask of the given shape (the logits' shape without the vocab axis)."""
  if where is None:
    return None
  w = jnp.asarray(where)
  if w.shape != tuple(shape):
    raise ValueError(
        f"{name} has shape {w.shape} but must have shape {tuple(shape)} (the positions of the"
        " inputs, without the vocabulary/feature axis). Pass one boolean per position.")
  if w.dtype != jnp.bool_:
    if not jnp.issubdtype(w.dtype, jnp.integer) and not jnp.issubdtype(w.dtype, jnp.bool_):
      raise TypeError(f"{name} must be a boolean mask (got dtype {w.dtype}).")
    w = w != 0
  return w


def check_temperature(temperature: Any) -> float:
  if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
    raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}.")
  if not np.isfinite(temperature) or temperature <= 0:
    raise ValueError(f"temperature must be > 0 (got {temperature}); use 1.0 for no scaling.")
  return float(temperature)


def check_unit_interval(value: Any, name: str, *, open_low: bool = False,
                        open_high: bool = False) -> float:
  """Checks ``value`` is a Python number in [0, 1] (ends optionally open)."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise TypeError(f"{name} must be a Python number in [0, 1], got {type(value).__name__}.")
  v = float(value)
  low_ok = v > 0 if open_low else v >= 0
  high_ok = v < 1 if open_high else v <= 1
  if not (np.isfinite(v) and low_ok and high_ok):
    lo = "(" if open_low else "["
    hi = ")" if open_high else "]"
    raise ValueError(f"{name} must lie in {lo}0, 1{hi} (got {value}).")
  return v


def check_positive(value: Any, name: str) -> float:
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise TypeError(f"{name} must be a Python number > 0, got {type(value).__name__}.")
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be > 0 (got {value}).")
  return float(value)


def check_ids(ids: Any, vocab_size: int, name: str, *, ignore_index: int | None = None) -> Array:
  """Validates integer token ids against ``[0, vocab_size)``.

  Concrete ids are checked eagerly; traced ids cannot be, and the caller gathers with
  ``mode="fill"`` so that an out-of-range id produces NaN rather than a silently wrong value.
  """
  ids = jnp.asarray(ids) if not isinstance(ids, jax.core.Tracer) else ids
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{name} must be integer token ids (got dtype {ids.dtype}).")
  if not isinstance(ids, jax.core.Tracer):
    host = np.asarray(ids)
    if ignore_index is not None:
      host = host[host != ignore_index]
    if host.size and (host.min() < 0 or host.max() >= vocab_size):
      bad = host[(host < 0) | (host >= vocab_size)]
      hint = f" (or equal to ignore_index={ignore_index})" if ignore_index is not None else ""
      raise ValueError(
          f"{name} contains ids outside the vocabulary [0, {vocab_size}): e.g."
          f" {bad[:5].tolist()} (min {host.min()}, max {host.max()}). Every id must be a valid"
          f" token id{hint}; check that data and model use the same tokenizer.")
  return ids


def compute_dtype(dtype: Any) -> Any:
  """The dtype losses compute in: at least float32 (bf16/f16 are upcast, float64 is kept)."""
  return jnp.promote_types(dtype, jnp.float32)


def log_softmax_t(logits: Array, temperature: float) -> Array:
  """``log_softmax(logits / T)`` computed in (at least) float32."""
  z = logits.astype(compute_dtype(logits.dtype))
  if temperature != 1.0:
    z = z / temperature
  return jax.nn.log_softmax(z, axis=-1)


def mask_rows(x: Array, where: Array | None, fill: float = 0.0) -> Array:
  """Replaces the ``[..., n]`` rows of ``x`` at positions where ``where`` is False by ``fill``.

  The first half of the double-where rule: the masked positions' inputs (which may hold
  anything, e.g. ``-inf`` logits that make a divergence infinite) never reach the math, so they
  give no NaN in the gradient either; :func:`apply_where` then zeroes their values.
  """
  if where is None:
    return x
  return jnp.where(where[..., None], x, jnp.asarray(fill, x.dtype))


def apply_where(values: Array, where: Array | None) -> Array:
  """Zeroes ``values`` where ``where`` is False (pair it with :func:`mask_rows` on the inputs)."""
  if where is None:
    return values
  return jnp.where(where, values, 0.0)


def nearest_names(name: str, choices, n: int = 3) -> list[str]:
  import difflib
  return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.4)
