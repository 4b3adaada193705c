"""Private teacher targets (Swing): the teacher's distribution clipped and noised, with its cost.

Swing distillation (Li et al., arXiv:2212.08349; docs/methods.md §16) protects what the teacher
knows from flowing into the student by injecting noise into the soft targets it releases. jkd
does this once, when the offline teacher cache is written, with the Gaussian mechanism and a
stated ``(epsilon, delta)``:

1. at each position the teacher's **full next-token distribution** ``p`` (temperature 1) is
   clipped to L2 norm ``C`` (:func:`clip_l2`; ``||p||_2 <= 1`` always, so ``C >= 1`` clips
   nothing). Clipped distributions are non-negative vectors of norm ``<= min(C, 1)``, so two of
   them differ by at most ``Delta_1 = sqrt(2) min(C, 1)`` in L2 (:func:`distribution_sensitivity`);
2. Gaussian noise ``N(0, sigma^2 I_V)`` is added to the whole ``V``-vector
   (:func:`add_gaussian_noise`);
3. the released target is a function of the noisy vector alone (post-processing keeps the
   guarantee): its ``k`` largest entries, negative values set to 0, renormalised
   (:func:`noisy_topk`); the tail bin is empty.

Noising the whole vector, not the top k, matters: *which* ids are the top k is itself a function
of the private distribution, and noise on k values would not hide it.

``sigma`` follows from ``(epsilon, delta)`` and the sensitivity of what one privacy unit
changes. With ``unit="sequence"`` (default) the unit is one training sequence: all ``T`` of its
released positions together, a ``V T`` vector of sensitivity ``Delta_1 sqrt(T)``, so the
``T`` positions are composed exactly (a Gaussian mechanism on their concatenation). With
``unit="position"`` the stated budget holds per position, and a whole sequence costs the
``epsilon_sequence`` reported beside it. Two calibrations:

* ``mechanism="analytic"`` (default): the analytic Gaussian mechanism of Balle & Wang (ICML
  2018, Theorem 8): the smallest ``sigma`` with ``Phi(D/(2 sigma) - epsilon sigma/D)
  - e^epsilon Phi(-D/(2 sigma) - epsilon sigma/D) <= delta`` (``D = Delta``;
  :func:`analytic_gaussian_sigma`, bisection; exact for any ``epsilon > 0``);
* ``mechanism="gaussian"``: the classic bound ``sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon``
  (Dwork & Roth 2014, Theorem A.1), valid for ``epsilon < 1`` only (:func:`gaussian_sigma`).

What is protected: the teacher's targets of one unit (label-level privacy). The tokens and labels
stored beside them are released as they are; a secret that the teacher reveals on ``m``
different sequences is exposed ``m`` times (compose: :func:`analytic_gaussian_epsilon` with
sensitivity ``sqrt(m)`` times larger). The noise seed must stay secret (whoever knows it can
subtract the noise); the floating-point sampling is not hardened against precision attacks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

#: Floor of the released log-probabilities (the cache's ``TAIL_FLOOR``): ids with no mass.
LOG_FLOOR = -30.0
#: ``sigma`` calibrations.
MECHANISMS = ("analytic", "gaussian")
#: Privacy units.
UNITS = ("sequence", "position")


# -------------------------------------------------------------------------------------------------
# Checks


def _real(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number (got {value!r}).")
  return float(value)


def _check_epsilon(epsilon) -> float:
  epsilon = _real("epsilon", epsilon)
  if epsilon <= 0:
    raise ValueError(f"epsilon must be > 0 (got {epsilon}); a smaller epsilon is more private"
                     " and needs more noise (e.g. 1 to 10).")
  return epsilon


def _check_delta(delta) -> float:
  delta = _real("delta", delta)
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1) (got {delta}); take it well below 1 / (number"
                     " of sequences), e.g. 1e-5.")
  return delta


def _check_positive(name: str, value) -> float:
  value = _real(name, value)
  if value <= 0:
    raise ValueError(f"{name} must be > 0 (got {value}).")
  return value


def _check_k(k, vocab: int) -> int:
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab:
    raise ValueError(f"k must be an int in [1, vocab={vocab}] (got {k!r}): the released target"
                     " keeps at least one id.")
  return int(k)


# -------------------------------------------------------------------------------------------------
# The Gaussian mechanism's calibration (host-side, float64)


def _phi(x: float) -> float:
  """The standard normal CDF."""
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _log_phi(x: float) -> float:
  """``log Phi(x)``, also far in the lower tail (asymptotic series below -30)."""
  if x > 0:
    return math.log1p(-0.5 * math.erfc(x / math.sqrt(2.0)))
  if x > -30:
    return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
  r = 1.0 / (x * x)
  return (-0.5 * x * x - math.log(-x) - 0.5 * math.log(2 * math.pi)
          + math.log1p(-r + 3 * r * r - 15 * r ** 3))


def gaussian_sigma(epsilon: float, delta: float, *, sensitivity: float = 1.0) -> float:
  """The classic Gaussian mechanism's noise: ``sigma = Delta sqrt(2 ln(1.25/delta)) / epsilon``.

  ``f(x) + N(0, sigma^2 I)`` is then ``(epsilon, delta)``-DP for an ``f`` of L2 sensitivity
  ``Delta``, when ``0 < epsilon < 1`` (Dwork & Roth, *The Algorithmic Foundations of
  Differential Privacy*, 2014, Theorem A.1).

  Args:
    epsilon: in ``(0, 1)``.
    delta: in ``(0, 1)``.
    sensitivity: ``Delta > 0``.

  Returns:
    ``sigma``.

  Raises:
    ValueError: a bad value, or ``epsilon >= 1`` (use :func:`analytic_gaussian_sigma`).

  >>> round(gaussian_sigma(0.5, 1e-5), 4)
  9.6896
  """
  epsilon, delta = _check_epsilon(epsilon), _check_delta(delta)
  sensitivity = _check_positive("sensitivity", sensitivity)
  if epsilon >= 1:
    raise ValueError(f"the classic Gaussian mechanism's bound holds for epsilon < 1 only (got"
                     f" {epsilon}); use the analytic Gaussian mechanism (mechanism='analytic',"
                     " any epsilon, and less noise).")
  return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def analytic_gaussian_delta(epsilon: float, sigma: float, *, sensitivity: float = 1.0) -> float:
  """The exact ``delta`` at ``epsilon`` of ``f(x) + N(0, sigma^2 I)`` (Balle & Wang 2018, Thm 8).

  ``delta(epsilon) = Phi(Delta/(2 sigma) - epsilon sigma/Delta)
  - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta)``: the mechanism is
  ``(epsilon, delta)``-DP exactly when ``delta >= delta(epsilon)``.

  Args:
    epsilon: ``>= 0``.
    sigma: the noise's standard deviation, ``> 0``.
    sensitivity: ``Delta > 0``, the L2 sensitivity of ``f``.

  Returns:
    ``delta(epsilon)`` in ``[0, 1]``.

  >>> round(analytic_gaussian_delta(1.0, 1.0), 4)
  0.1269
  """
  epsilon = _real("epsilon", epsilon)
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0 (got {epsilon}).")
  sigma = _check_positive("sigma", sigma)
  u = _check_positive("sensitivity", sensitivity) / sigma
  first = _phi(0.5 * u - epsilon / u)
  second = math.exp(epsilon + _log_phi(-0.5 * u - epsilon / u))  # <= first: no overflow
  return min(max(first - second, 0.0), 1.0)


def analytic_gaussian_sigma(epsilon: float, delta: float, *, sensitivity: float = 1.0) -> float:
  """The smallest ``sigma`` with :func:`analytic_gaussian_delta` ``<= delta`` (any ``epsilon``).

  ``delta(epsilon)`` decreases in ``sigma``; the root is bracketed by halving/doubling, then
  bisected to a relative ``1e-12`` and the upper end (which satisfies the bound) returned.

  Args:
    epsilon: ``> 0``.
    delta: in ``(0, 1)``.
    sensitivity: ``Delta > 0``.

  Returns:
    ``sigma``.

  >>> s = analytic_gaussian_sigma(1.0, 1e-5)
  >>> round(s, 3), analytic_gaussian_delta(1.0, s) <= 1e-5 < analytic_gaussian_delta(1.0, 0.999 * s)
  (3.731, True)
  """
  epsilon, delta = _check_epsilon(epsilon), _check_delta(delta)
  sensitivity = _check_positive("sensitivity", sensitivity)
  lo = hi = sensitivity
  while analytic_gaussian_delta(epsilon, hi, sensitivity=sensitivity) > delta:
    hi *= 2.0
  while analytic_gaussian_delta(epsilon, lo, sensitivity=sensitivity) <= delta:
    lo *= 0.5
  while hi - lo > 1e-12 * hi:
    mid = 0.5 * (lo + hi)
    if analytic_gaussian_delta(epsilon, mid, sensitivity=sensitivity) > delta:
      lo = mid
    else:
      hi = mid
  return hi


def analytic_gaussian_epsilon(sigma: float, delta: float, *, sensitivity: float = 1.0) -> float:
  """The smallest ``epsilon >= 0`` for which noise ``sigma`` is ``(epsilon, delta)``-DP.

  The inverse of :func:`analytic_gaussian_sigma` in ``epsilon`` (exact for any Gaussian
  mechanism, whichever formula chose its ``sigma``). Also the cost of composing: ``m`` releases
  of sensitivity ``Delta`` each with the same ``sigma`` cost
  ``analytic_gaussian_epsilon(sigma, delta, sensitivity=sqrt(m) * Delta)``.

  >>> round(analytic_gaussian_epsilon(analytic_gaussian_sigma(2.0, 1e-5), 1e-5), 6)
  2.0
  """
  sigma, delta = _check_positive("sigma", sigma), _check_delta(delta)
  sensitivity = _check_positive("sensitivity", sensitivity)
  if analytic_gaussian_delta(0.0, sigma, sensitivity=sensitivity) <= delta:
    return 0.0
  lo, hi = 0.0, 1.0
  while analytic_gaussian_delta(hi, sigma, sensitivity=sensitivity) > delta:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-12 * hi:
    mid = 0.5 * (lo + hi)
    if analytic_gaussian_delta(mid, sigma, sensitivity=sensitivity) > delta:
      lo = mid
    else:
      hi = mid
  return hi


def noise_sigma(epsilon: float, delta: float, *, sensitivity: float,
                mechanism: str = "analytic") -> float:
  """``sigma`` of :data:`MECHANISMS` ``mechanism`` for ``(epsilon, delta)`` and ``Delta``."""
  if mechanism not in MECHANISMS:
    raise ValueError(f"mechanism must be one of {list(MECHANISMS)} (got {mechanism!r}).")
  fn = analytic_gaussian_sigma if mechanism == "analytic" else gaussian_sigma
  return fn(epsilon, delta, sensitivity=sensitivity)


def distribution_sensitivity(clip: float) -> float:
  """L2 sensitivity of one position's clipped distribution: ``sqrt(2) min(C, 1)``.

  Clipped distributions are non-negative with norm ``<= min(C, 1)``, so
  ``||u - v||^2 = ||u||^2 + ||v||^2 - 2 u.v <= 2 min(C, 1)^2`` (``u.v >= 0``); two point masses
  on different tokens reach it.

  >>> round(distribution_sensitivity(0.5), 6), round(distribution_sensitivity(3.0), 6)
  (0.707107, 1.414214)
  """
  return math.sqrt(2.0) * min(_check_positive("clip", clip), 1.0)


# -------------------------------------------------------------------------------------------------
# The release (jit-able, float32)


def clip_l2(x: Array, clip: float | Array) -> Array:
  """``x * min(1, C / ||x||_2)`` over the last axis (zero vectors stay zero).

  Args:
    x: ``[..., V]`` (computed in float32).
    clip: ``C > 0``.

  Returns:
    ``[..., V]`` float32, each vector of norm ``<= C``.

  >>> [round(float(v), 4) for v in clip_l2(jnp.array([3.0, 4.0]), 1.0)]
  [0.6, 0.8]
  """
  if isinstance(clip, numbers.Real):
    _check_positive("clip", clip)
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  scale = jnp.minimum(1.0, clip / jnp.where(norm > 0, norm, 1.0))
  return x * scale


def add_gaussian_noise(x: Array, key: jax.Array, *, sigma: float | Array) -> Array:
  """``x + sigma * N(0, I)`` (float32), the noise drawn from ``key``."""
  if isinstance(sigma, numbers.Real):
    _check_positive("sigma", sigma)
  x = jnp.asarray(x, jnp.float32)
  return x + jnp.asarray(sigma, jnp.float32) * jax.random.normal(key, x.shape, jnp.float32)


def noisy_topk(noisy: Array, k: int, *, floor: float = LOG_FLOOR
               ) -> tuple[Array, Array, Array]:
  """The released target of a noisy distribution (post-processing of the noisy vector only).

  The ``k`` largest entries of ``noisy``; their values, negative ones set to 0, renormalised to
  sum to one (uniform over the k when none is positive); log-probabilities floored at
  ``floor``; the tail (mass outside the k) empty, ``floor``.

  Args:
    noisy: ``[..., V]`` noisy (clipped) distribution.
    k: ids kept, ``1 <= k <= V``.
    floor: the log-probability of an id with no mass, and of the tail.

  Returns:
    ``(ids [..., k] int32, logprobs [..., k] float32, tail [...] float32)``.

  >>> ids, lp, tail = noisy_topk(jnp.array([0.1, 0.6, -0.2, 0.3]), 3)
  >>> ids.tolist(), [round(float(x), 4) for x in jnp.exp(lp)], float(tail)
  ([1, 3, 0], [0.6, 0.3, 0.1], -30.0)
  """
  noisy = jnp.asarray(noisy, jnp.float32)
  k = _check_k(k, noisy.shape[-1])
  values, ids = jax.lax.top_k(noisy, k)
  weights = jnp.maximum(values, 0.0)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  logp = jnp.where(total > 0, jnp.log(weights) - jnp.log(jnp.where(total > 0, total, 1.0)),
                   -math.log(k))
  return ids, jnp.maximum(logp, floor), jnp.full(noisy.shape[:-1], floor, jnp.float32)


def private_topk(logits: Array, key: jax.Array, *, sigma: float | Array, clip: float | Array,
                 k: int, floor: float = LOG_FLOOR) -> tuple[Array, Array, Array]:
  """Swing's released target from teacher logits: softmax, :func:`clip_l2`,
  :func:`add_gaussian_noise` on the whole vector, :func:`noisy_topk`.

  Args:
    logits: ``[..., V]`` teacher logits (temperature 1; float32 compute).
    key: the noise's key (secret).
    sigma: noise standard deviation (:meth:`PrivacySpec.plan`).
    clip: L2 clip ``C`` of each position's distribution.
    k: ids released per position.
    floor: see :func:`noisy_topk`.

  Returns:
    ``(ids [..., k] int32, logprobs [..., k] float32, tail [...] float32)``.
  """
  p = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  noisy = add_gaussian_noise(clip_l2(p, clip), key, sigma=sigma)
  return noisy_topk(noisy, k, floor=floor)


# -------------------------------------------------------------------------------------------------
# The run's plan


@dataclasses.dataclass(frozen=True)
class PrivacySpec:
  """A private teacher cache's stated guarantee; :meth:`plan` gives its noise.

  Attributes:
    epsilon: ``> 0`` (``< 1`` with ``mechanism="gaussian"``).
    delta: in ``(0, 1)``.
    clip: ``C > 0``, the L2 clip of each position's distribution (``>= 1``: none).
    mechanism: ``"analytic"`` (Balle & Wang) or ``"gaussian"`` (classic).
    unit: ``"sequence"`` (the budget covers all positions of one training sequence) or
      ``"position"``.
    seed: the noise's seed; None draws a secret one from the OS (a fixed seed is for tests: it
      lets anyone who knows it remove the noise).

  >>> plan = PrivacySpec(epsilon=8.0, delta=1e-5).plan(positions=16)
  >>> round(plan["sensitivity"], 4), round(plan["epsilon_sequence"], 4)
  (5.6569, 8.0)
  """
  epsilon: float
  delta: float = 1e-5
  clip: float = 1.0
  mechanism: str = "analytic"
  unit: str = "sequence"
  seed: int | None = None

  def __post_init__(self):
    _check_epsilon(self.epsilon)
    _check_delta(self.delta)
    _check_positive("clip", self.clip)
    if self.mechanism not in MECHANISMS:
      raise ValueError(f"mechanism must be one of {list(MECHANISMS)} (got {self.mechanism!r}).")
    if self.mechanism == "gaussian" and self.epsilon >= 1:
      raise ValueError(f"mechanism='gaussian' (the classic bound) needs epsilon < 1 (got"
                       f" {self.epsilon}); use mechanism='analytic'.")
    if self.unit not in UNITS:
      raise ValueError(f"unit must be one of {list(UNITS)} (got {self.unit!r}).")
    if self.seed is not None and (isinstance(self.seed, bool)
                                  or not isinstance(self.seed, numbers.Integral)):
      raise ValueError(f"seed must be an int or None (got {self.seed!r}).")

  def plan(self, positions: int) -> dict[str, Any]:
    """The noise of a cache whose sequences release ``positions`` targets each.

    Returns:
      ``{"mechanism", "unit", "epsilon", "delta", "clip", "positions", "sensitivity" (of the
      unit), "sigma", "epsilon_position", "epsilon_sequence", "vector", "released",
      "noise_seed"}``: ``epsilon_position`` and ``epsilon_sequence`` are the exact costs (at
      ``delta``) of one position and of one whole sequence at this ``sigma``.
    """
    if isinstance(positions, bool) or not isinstance(positions, numbers.Integral) \
        or positions < 1:
      raise ValueError(f"positions must be an int >= 1 (got {positions!r}).")
    per_position = distribution_sensitivity(self.clip)
    per_sequence = per_position * math.sqrt(positions)
    sensitivity = per_sequence if self.unit == "sequence" else per_position
    sigma = noise_sigma(self.epsilon, self.delta, sensitivity=sensitivity,
                        mechanism=self.mechanism)
    return {"method": "Swing", "mechanism": self.mechanism, "unit": self.unit,
            "epsilon": float(self.epsilon), "delta": float(self.delta),
            "clip": float(self.clip), "positions": int(positions),
            "sensitivity": sensitivity, "sigma": sigma,
            "epsilon_position": analytic_gaussian_epsilon(sigma, self.delta,
                                                          sensitivity=per_position),
            "epsilon_sequence": analytic_gaussian_epsilon(sigma, self.delta,
                                                          sensitivity=per_sequence),
            "vector": "each position's full next-token distribution, L2-clipped",
            "released": "top-k of the noisy vector, renormalised (post-processing)",
            "noise_seed": "secret" if self.seed is None else "fixed (the noise is not private)"}
