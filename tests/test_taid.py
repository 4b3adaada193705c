"""TAID's adaptive schedule (jkd.losses.taid) against a NumPy reimplementation of
docs/methods.md §2.2."""

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

# A loss curve that falls, stalls, rises and falls again: the momentum changes sign.
LOSSES = [3.0, 2.6, 2.3, 2.2, 2.2, 2.25, 2.4, 2.1, 1.8, 1.7, 1.65, 1.6, 1.7, 1.5, 1.2, 1.1, 1.05,
          1.0, 0.98, 0.97]

SCHEDULES = {
    # The paper's defaults: over 20 steps the linear floor leads.
    "defaults": dict(total_steps=20),
    # A large step size: the adaptive increment leads, and is clamped at t_end.
    "adaptive": dict(total_steps=1000, alpha=0.2, beta=0.9, t_start=0.2, t_end=0.8),
    # Both matter; ends early, so the floor passes t_end and the clamp holds.
    "mixed": dict(total_steps=15, alpha=0.02, beta=0.5, t_start=0.1, t_end=0.9),
}


def _run_jitted(options, losses_seq, first_step=0):
  update = jit(functools.partial(losses.taid_update, **options))
  state = losses.taid_init(t_start=options.get("t_start", 0.4))
  states = []
  for i, loss in enumerate(losses_seq):
    state = update(state, jnp.float32(loss), jnp.int32(first_step + i))
    states.append(state)
  return states


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_reference(name):
  options = SCHEDULES[name]
  expected = ref.taid_schedule(LOSSES, **options)
  got = _run_jitted(options, LOSSES)
  for step, (state, (t, m, prev)) in enumerate(zip(got, expected)):
    msg = f"step {step}"
    np.testing.assert_allclose(state.t, t, rtol=1e-6, atol=1e-7, err_msg=msg)
    np.testing.assert_allclose(state.momentum, m, rtol=1e-5, atol=1e-7, err_msg=msg)
    np.testing.assert_allclose(state.prev_loss, prev, rtol=1e-7, err_msg=msg)
    assert bool(state.started)
    assert state.t.dtype == jnp.float32 and state.t.shape == ()
  ts = [t for t, _, _ in expected]
  assert all(b >= a for a, b in zip(ts, ts[1:]))  # t never decreases
  assert ts[-1] > ts[0]
  if name == "adaptive":  # the adaptive increment beat the floor, then hit the clamp
    t_lin = [options["t_start"] + (options["t_end"] - options["t_start"]) * s / 1000
             for s in range(len(LOSSES))]
    assert ts[5] > t_lin[5] + 0.1
  if name in ("adaptive", "mixed"):
    assert ts[-1] == pytest.approx(options["t_end"])


def test_first_update_only_stores_the_loss():
  state = losses.taid_init(t_start=0.3)
  assert float(state.t) == pytest.approx(0.3) and not bool(state.started)
  update = jit(functools.partial(losses.taid_update, total_steps=10, alpha=0.5, t_start=0.3))
  first = update(state, jnp.float32(2.0), jnp.int32(7))
  # Even at step 7, whose linear floor is 0.79: the first update changes nothing but prev.
  assert float(first.t) == pytest.approx(0.3)
  assert float(first.momentum) == 0.0
  assert float(first.prev_loss) == 2.0
  assert bool(first.started)
  second = update(first, jnp.float32(1.0), jnp.int32(8))
  t, m, prev = ref.taid_schedule([2.0, 1.0], total_steps=10, alpha=0.5, t_start=0.3,
                                 first_step=7)[-1]
  np.testing.assert_allclose([second.t, second.momentum, second.prev_loss], [t, m, prev],
                             rtol=1e-6)
  assert float(second.t) > 0.8  # the floor at step 8 is 0.86


def test_state_is_a_pytree_that_scans():
  """The schedule inside lax.scan (a jitted train loop) equals the step-by-step updates."""
  options = SCHEDULES["mixed"]

  @jit
  def run(loss_seq):
    def body(state, xs):
      loss, step = xs
      state = losses.taid_update(state, loss, step, **options)
      return state, state.t
    return jax.lax.scan(body, losses.taid_init(t_start=options["t_start"]),
                        (loss_seq, jnp.arange(loss_seq.shape[0])))

  final, ts = run(jnp.asarray(LOSSES, jnp.float32))
  expected = ref.taid_schedule(LOSSES, **options)
  np.testing.assert_allclose(ts, [t for t, _, _ in expected], rtol=1e-6, atol=1e-7)
  leaves = jax.tree.leaves(final)
  assert len(leaves) == 4 and all(leaf.shape == () for leaf in leaves)


def test_loss_is_detached():
  state = losses.taid_update(losses.taid_init(), 2.0, 0, total_steps=10)
  grad = jax.grad(lambda loss: losses.taid_update(state, loss, 1, total_steps=10,
                                                  alpha=0.5).t)(1.0)
  assert float(grad) == 0.0


def test_schedule_drives_taid_kl(rng):
  """The state's t, traced, feeds taid_kl: loss values as the reference at that t."""
  zs = (rng.standard_normal((3, 9)) * 2).astype(np.float32)
  zt = (rng.standard_normal((3, 9)) * 2).astype(np.float32)
  options = SCHEDULES["mixed"]

  @jit
  def step(state, zs, step):
    loss = losses.masked_mean(losses.taid_kl(zs, zt, t=state.t, temperature=2.0))
    return losses.taid_update(state, loss, step, **options), loss

  state = losses.taid_init(t_start=options["t_start"])
  for i in range(3):
    t = float(state.t)
    state, loss = step(state, zs, jnp.int32(i))
    expected = ref.masked_mean(ref.full_divergence("taid", zs, zt, t=t, temperature=2.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_bad_options_raise_clear_errors():
  state = losses.taid_init()
  update = functools.partial(losses.taid_update, state, 1.0, 0)
  with pytest.raises(ValueError, match=r"t_start must lie in \[0, 1\]"):
    losses.taid_init(t_start=1.5)
  with pytest.raises(ValueError, match=r"t_start must lie in \[0, 1\]"):
    update(total_steps=10, t_start=-0.1)
  with pytest.raises(ValueError, match=r"t_end must lie in \[0, 1\]"):
    update(total_steps=10, t_end=1.1)
  with pytest.raises(ValueError, match=r"t_end \(0.3\) must be >= t_start \(0.4\)"):
    update(total_steps=10, t_end=0.3)
  for bad in (0, -5, 10.0):
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
      update(total_steps=bad)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    update(total_steps=10, alpha=0.0)
  with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
    update(total_steps=10, beta=1.5)
  with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'total_steps'"):
    update()
