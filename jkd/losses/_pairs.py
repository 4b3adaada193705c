"""Shared checks and math of the pairwise preference losses (``dpo``, ``reference_free``,
``aligned_teacher``): per-sequence log-probs as float32 ``[batch]`` arrays, ``beta`` and
label-smoothing checks, ``log(1 - exp(x))`` and the smoothed log-sigmoid loss."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jkd.losses import _common

Array = jax.Array


def as_logps(*arrays: Any, names: Sequence[str]) -> list[Array]:
  out = []
  shape = None
  for a, name in zip(arrays, names):
    a = _common.check_float_array(a, name)
    a = a.astype(_common.compute_dtype(a.dtype))
    if a.ndim != 1:
      raise ValueError(f"{name} must be per-sequence log-probs of shape [batch], got {a.shape}.")
    if shape is None:
      shape = a.shape
    elif a.shape != shape:
      raise ValueError(
          f"{name} has shape {a.shape} but {names[0]} has {shape}: the chosen/rejected and"
          " policy/reference log-probs must all be [batch] for the same pairs.")
    out.append(a)
  return out


FOUR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def check_beta(beta: Any) -> float:
  return _common.check_positive(beta, "beta")


def check_smoothing(value: Any, name: str = "label_smoothing", high: float = 1.0,
               inclusive: bool = False) -> float:
  """``value`` in ``[0, high)``, or ``[0, high]`` when ``inclusive``."""
  v = _common.check_unit_interval(value, name)
  if v > high or (v == high and not inclusive):
    raise ValueError(f"{name} must be {'<=' if inclusive else '<'} {high} (got {value}).")
  return v


def log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative ``x``."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def smoothed_sigmoid(x: Array, e: float) -> Array:
  return -(1 - e) * jax.nn.log_sigmoid(x) - e * jax.nn.log_sigmoid(-x)
