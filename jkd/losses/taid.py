"""TAID's adaptive interpolation schedule as pure functions over an explicit state pytree.

The loss itself is :func:`jkd.losses.taid_kl`; this module moves its ``t`` from ``t_start`` to
``t_end`` during training. The state is a plain NamedTuple of arrays, so it is checkpointed and
restored with the rest of the train state, and a resumed run continues the same schedule.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkd.losses import _common

Array = jax.Array


class TAIDState(NamedTuple):
  """TAID's schedule state.

  Attributes:
    t: current interpolation coefficient (scalar float32).
    momentum: momentum ``m`` of the relative loss change.
    prev_loss: the detached loss of the previous update.
    started: False until the first update has stored ``prev_loss``.
  """
  t: Array
  momentum: Array
  prev_loss: Array
  started: Array


def taid_init(*, t_start: float = 0.4) -> TAIDState:
  """The schedule's initial state, ``t = t_start``.

  >>> float(taid_init(t_start=0.4).t)
  0.4000000059604645
  """
  t_start = _common.check_unit_interval(t_start, "t_start")
  return TAIDState(t=jnp.asarray(t_start, jnp.float32), momentum=jnp.zeros((), jnp.float32),
                   prev_loss=jnp.zeros((), jnp.float32), started=jnp.zeros((), jnp.bool_))


def taid_update(state: TAIDState, loss: Array, step: Array, *, total_steps: int,
                t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                beta: float = 0.99) -> TAIDState:
  r"""One step of TAID's adaptive schedule, from the (detached) loss of this step.

  First call: store ``prev = L`` and nothing else. Then

  .. math::
     rel = (prev - L) / (prev + 10^{-15}),\ m \leftarrow \beta m + (1-\beta) rel,\
     \delta = \alpha\,\sigma(m)(1 - t),\
     t \leftarrow \min(t_{end}, \max(t_{start} + (t_{end}-t_{start})\,step/total, t + \delta))

  Args:
    state: the current :class:`TAIDState`.
    loss: scalar loss of this step (gradients are stopped).
    step: the step number (0-based) of this update, scalar.
    total_steps: number of training steps over which ``t`` reaches ``t_end`` linearly at least.
    t_start, t_end: range of ``t`` (0.4 and 1.0 in the paper).
    alpha: step size of the adaptive increment (5e-4).
    beta: momentum coefficient (0.99).

  Returns:
    The new state.

  References: Shing et al., *TAID*, ICLR 2025; SakanaAI/TAID ``src/distil_losses/taid.py``.

  >>> s = taid_update(taid_init(), 2.0, 0, total_steps=100)
  >>> s = taid_update(s, 1.0, 1, total_steps=100)
  >>> 0.4 < float(s.t) < 1.0
  True
  """
  t_start = _common.check_unit_interval(t_start, "t_start")
  t_end = _common.check_unit_interval(t_end, "t_end")
  if t_end < t_start:
    raise ValueError(f"t_end ({t_end}) must be >= t_start ({t_start}).")
  alpha = _common.check_positive(alpha, "alpha")
  beta = _common.check_unit_interval(beta, "beta")
  if not isinstance(total_steps, int) or total_steps <= 0:
    raise ValueError(f"total_steps must be a positive int (got {total_steps!r}).")
  loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
  step = jnp.asarray(step, jnp.float32)
  rel = (state.prev_loss - loss) / (state.prev_loss + 1e-15)
  momentum = beta * state.momentum + (1.0 - beta) * rel
  delta = alpha * jax.nn.sigmoid(momentum) * (1.0 - state.t)
  t_linear = t_start + (t_end - t_start) * step / total_steps
  t = jnp.minimum(t_end, jnp.maximum(t_linear, state.t + delta))
  started = state.started
  return TAIDState(
      t=jnp.where(started, t, state.t).astype(jnp.float32),
      momentum=jnp.where(started, momentum, state.momentum).astype(jnp.float32),
      prev_loss=loss,
      started=jnp.ones((), jnp.bool_))
