"""Token-level divergences between a student and a teacher distribution (white-box KD).

Each public function takes logits ``[..., vocab]`` of both models and returns the unreduced
divergence per position, shape ``logits.shape[:-1]``, zero where ``where`` is False, multiplied
by ``temperature**2`` (Hinton et al., 2015, so that gradient scale does not depend on ``T``).
All are true divergences: zero when the two distributions are equal and never negative, up to
rounding. (Many reference implementations return only the cross-entropy ``-sum p log q``: the
same gradient, a different value.) Computation is in float32 whatever the input dtype (float64
inputs stay float64, e.g. for gradient checks); mixtures are formed in log space; banned tokens
(``-inf`` logits) give no NaN, in values or gradients.

The math lives in *cores* that act on log-probabilities over the last axis; the same cores serve
the full form here, the sparse (top-k teacher) form in :mod:`jkd.losses.sparse` and the
memory-bounded form in :mod:`jkd.losses.fused`.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jkd.losses import _common

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Cores: (student_logprobs, teacher_logprobs, **options) -> [...], over the last axis.
# ----------------------------------------------------------------------------------------------

def _kl(log_p: Array, log_q: Array) -> Array:
  """``KL(p || q) = sum p (log p - log q)`` over the last axis, with ``0 log 0 = 0``."""
  p = jnp.exp(log_p)
  diff = jnp.where(p > 0, log_p - log_q, 0.0)
  return jnp.sum(p * diff, axis=-1)


def _log_mix(log_a: Array, log_b: Array, weight_a: float) -> Array:
  """``log(w * a + (1 - w) * b)`` for log-probabilities, NaN-free also where both are zero."""
  if weight_a == 0.0:
    return log_b
  if weight_a == 1.0:
    return log_a
  both_zero = jnp.isneginf(log_a) & jnp.isneginf(log_b)
  safe_a = jnp.where(both_zero, 0.0, log_a)
  safe_b = jnp.where(both_zero, 0.0, log_b)
  mixed = jnp.logaddexp(safe_a + math.log(weight_a), safe_b + math.log1p(-weight_a))
  return jnp.where(both_zero, -jnp.inf, mixed)


def _core_forward_kl(log_q: Array, log_p: Array) -> Array:
  return _kl(log_p, log_q)


def _core_reverse_kl(log_q: Array, log_p: Array) -> Array:
  return _kl(log_q, log_p)


def _core_generalized_jsd(log_q: Array, log_p: Array, *, beta: float = 0.5) -> Array:
  if beta == 0.0:
    return _kl(log_p, log_q)
  if beta == 1.0:
    return _kl(log_q, log_p)
  log_m = _log_mix(log_p, log_q, beta)
  return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _core_skew_kl(log_q: Array, log_p: Array, *, alpha: float = 0.1) -> Array:
  return _kl(log_p, _log_mix(log_p, log_q, alpha))


def _core_skew_reverse_kl(log_q: Array, log_p: Array, *, alpha: float = 0.1) -> Array:
  return _kl(log_q, _log_mix(log_q, log_p, alpha))


def _core_total_variation(log_q: Array, log_p: Array) -> Array:
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def _core_adaptive_kl(log_q: Array, log_p: Array, *, mu: float = 0.5) -> Array:
  p = jnp.exp(log_p)
  q = jnp.exp(log_q)
  # Head: the teacher's most likely tokens, in order, until their cumulative probability reaches
  # mu (the token that crosses mu is in the head). Found through a threshold on the unsorted
  # probabilities, so the mask is applied to the tokens it was computed for.
  sorted_p = -jnp.sort(-jax.lax.stop_gradient(p), axis=-1)
  exclusive_cumsum = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  n_head = jnp.maximum(jnp.sum(exclusive_cumsum < mu, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_p, n_head - 1, axis=-1)
  head = jax.lax.stop_gradient(p) >= threshold
  gap = jax.lax.stop_gradient(jnp.abs(p - q))
  g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
  total = g_head + g_tail
  safe_total = jnp.where(total > 0, total, 1.0)
  w_head = jnp.where(total > 0, g_head / safe_total, 0.5)
  w_tail = jnp.where(total > 0, g_tail / safe_total, 0.5)
  return w_head * _kl(log_p, log_q) + w_tail * _kl(log_q, log_p)


def _entropy(log_p: Array) -> Array:
  """``H(p) = -sum p log p`` over the last axis, with ``0 log 0 = 0`` (no gradient flows)."""
  log_p = jax.lax.stop_gradient(log_p)
  p = jnp.exp(log_p)
  return jnp.maximum(-jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, log_p, 0.0), 0.0), axis=-1),
                     0.0)


def _core_balanced_kl(log_q: Array, log_p: Array) -> Array:
  # BD-KD: forward KL weighted by the teacher's entropy, reverse KL by the student's, both
  # normalised to sum to 1; the weights are constants for the gradient. A zero weight kills its
  # term even where that KL is infinite (0 * inf would be NaN).
  h_q, h_p = _entropy(log_q), _entropy(log_p)
  total = h_q + h_p
  safe_total = jnp.where(total > 0, total, 1.0)
  w_fwd = jnp.where(total > 0, h_p / safe_total, 0.5)
  w_rev = jnp.where(total > 0, h_q / safe_total, 0.5)
  return (jnp.where(w_fwd > 0, w_fwd * _kl(log_p, log_q), 0.0)
          + jnp.where(w_rev > 0, w_rev * _kl(log_q, log_p), 0.0))


def _core_taid(log_q: Array, log_p: Array, *, t: Any) -> Array:
  # Interpolating logits equals interpolating log-probs up to a per-row constant, which the
  # log_softmax removes; -inf is replaced by a large finite number so that 0 * -inf never occurs.
  t = jnp.asarray(t, jnp.float32)
  lq = jnp.maximum(jax.lax.stop_gradient(log_q), -1e30)
  lp = jnp.maximum(log_p, -1e30)
  log_target = jax.nn.log_softmax((1.0 - t) * lq + t * lp, axis=-1)
  return _kl(log_target, log_q)


def _check_taid_t(t: Any) -> Any:
  if isinstance(t, (int, float)) and not isinstance(t, bool):
    return _common.check_unit_interval(t, "t")
  if isinstance(t, jax.core.Tracer):
    return t
  if isinstance(t, (str, bytes, bool)) or t is None:
    raise TypeError(f"t must be a Python number in [0, 1] or a scalar array, got {t!r}.")
  arr = jnp.asarray(t)
  if arr.ndim != 0 and arr.size != 1:
    raise ValueError(f"TAID's t must be a scalar (got shape {arr.shape}).")
  _common.check_unit_interval(float(arr.reshape(())), "t")
  return arr


_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {
    "beta": lambda v: _common.check_unit_interval(v, "beta"),
    "alpha": lambda v: _common.check_unit_interval(v, "alpha"),
    "mu": lambda v: _common.check_unit_interval(v, "mu", open_low=True),
    "t": _check_taid_t,
}

#: Divergence cores by name: ``core(student_logprobs, teacher_logprobs, **options)``.
CORES: dict[str, Callable[..., Array]] = {
    "forward_kl": _core_forward_kl,
    "reverse_kl": _core_reverse_kl,
    "generalized_jsd": _core_generalized_jsd,
    "skew_kl": _core_skew_kl,
    "skew_reverse_kl": _core_skew_reverse_kl,
    "total_variation": _core_total_variation,
    "adaptive_kl": _core_adaptive_kl,
    "balanced_kl": _core_balanced_kl,
    "taid": _core_taid,
}


# ----------------------------------------------------------------------------------------------
# Closed-form gradients: forward KL, reverse KL and the generalized JSD from logits.
# ----------------------------------------------------------------------------------------------
#
# Differentiating the cores through two log_softmaxes makes XLA keep or recompute many [..., V]
# intermediates (exp, log, their products) in the backward pass: on a CPU the elementwise work
# over a 49k vocabulary costs as much as a large matrix product. These divergences have short
# gradients with respect to the logits (u = z / T, q = softmax(u_s), p = softmax(u_t)):
#
#   forward KL  D = sum p (log p - log q):  dD/du_s = q - p,             dD/du_t = p (log p/q - D)
#   reverse KL  D = sum q (log q - log p):  dD/du_s = q (log q/p - D),   dD/du_t = p - q
#   GJSD(beta)  m = beta p + (1 - beta) q:  dD/du_s = (1 - beta) q (r - sum q r), r = log q/m
#                                           dD/du_t = beta p (s - sum p s),       s = log p/m
#
# (the m-terms of the JSD cancel: d/dm [beta KL(p||m) + (1 - beta) KL(q||m)] is constant), so
# they are formed in the forward pass, as Liger-Kernel's fused losses do, and the backward pass
# only scales them. Zero-probability tokens (-inf logits) contribute 0, never NaN.

#: Divergences with a closed-form gradient (:func:`divergence_values` uses it).
CLOSED_FORM = ("forward_kl", "reverse_kl", "generalized_jsd")


def _xlogy_diff(prob: Array, log_a: Array, log_b: Array) -> Array:
  """``log_a - log_b`` where ``prob > 0``, else 0 (so that ``prob * diff`` is never NaN)."""
  return jnp.where(prob > 0, log_a - log_b, 0.0)


def _closed_form_parts(name: str, beta: float, temperature: float, zs: Array, zt: Array):
  """Per-position ``T^2 D`` and the gradients with respect to ``zs`` and ``zt`` (unscaled)."""
  t = temperature
  log_q = _common.log_softmax_t(zs, t)
  log_p = _common.log_softmax_t(zt, t)
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  if name == "forward_kl":
    r = _xlogy_diff(p, log_p, log_q)
    d = jnp.sum(p * r, axis=-1)
    grad_s, grad_t = q - p, p * (r - d[..., None])
  elif name == "reverse_kl":
    r = _xlogy_diff(q, log_q, log_p)
    d = jnp.sum(q * r, axis=-1)
    grad_s, grad_t = q * (r - d[..., None]), p - q
  else:
    log_m = jnp.log(beta * p + (1.0 - beta) * q)
    r_s, r_t = _xlogy_diff(q, log_q, log_m), _xlogy_diff(p, log_p, log_m)
    ds, dt = jnp.sum(q * r_s, axis=-1), jnp.sum(p * r_t, axis=-1)
    d = beta * dt + (1.0 - beta) * ds
    grad_s = (1.0 - beta) * q * (r_s - ds[..., None])
    grad_t = beta * p * (r_t - dt[..., None])
  return d * (t * t), (grad_s * t, grad_t * t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _closed_form(name: str, beta: float, temperature: float, zs: Array, zt: Array) -> Array:
  return _closed_form_parts(name, beta, temperature, zs, zt)[0]


def _closed_form_fwd(name, beta, temperature, zs, zt):
  values, (grad_s, grad_t) = _closed_form_parts(name, beta, temperature, zs, zt)
  return values, (grad_s.astype(zs.dtype), grad_t.astype(zt.dtype))


def _closed_form_bwd(name, beta, temperature, residuals, g):
  del name, beta, temperature
  grad_s, grad_t = residuals
  g = g[..., None]
  return (g * grad_s).astype(grad_s.dtype), (g * grad_t).astype(grad_t.dtype)


_closed_form.defvjp(_closed_form_fwd, _closed_form_bwd)


def divergence_values(divergence: str, student_logits: Array, teacher_logits: Array, *,
                      temperature: float, options: dict[str, Any]) -> Array:
  """``T^2 D(softmax(zs / T), softmax(zt / T))`` per position for a resolved divergence.

  The divergences of :data:`CLOSED_FORM` (with static options) take their closed-form
  gradients; the others differentiate their core. Inputs must be validated and masked already
  (:func:`full_divergence` does that).
  """
  beta = options.get("beta", 0.5)
  if divergence == "generalized_jsd" and isinstance(beta, (int, float)):
    if beta == 0.0:
      divergence = "forward_kl"
    elif beta == 1.0:
      divergence = "reverse_kl"
  if divergence in CLOSED_FORM and all(isinstance(v, (int, float)) for v in options.values()):
    return _closed_form(divergence, float(beta), float(temperature), student_logits,
                        teacher_logits)
  log_q = _common.log_softmax_t(student_logits, temperature)
  log_p = _common.log_softmax_t(teacher_logits, temperature)
  return CORES[divergence](log_q, log_p, **options) * (temperature ** 2)


def resolve_core(divergence: str, options: dict[str, Any]) -> tuple[Callable[..., Array], dict]:
  """Returns the core named ``divergence`` and its validated options (clear errors otherwise)."""
  if not isinstance(divergence, str) or divergence not in CORES:
    near = _common.nearest_names(str(divergence), CORES)
    raise ValueError(
        f"unknown divergence {divergence!r}; choose one of {sorted(CORES)}"
        + (f" (did you mean {near[0]!r}?)" if near else "."))
  core = CORES[divergence]
  params = inspect.signature(core).parameters
  allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise TypeError(
        f"divergence {divergence!r} takes no option(s) {unknown}; its options are {allowed}.")
  checked = {}
  for name in allowed:
    if name in options:
      checked[name] = _OPTION_CHECKS[name](options[name])
    elif params[name].default is inspect.Parameter.empty:
      raise TypeError(f"divergence {divergence!r} needs the option {name!r}.")
  return core, checked


def full_divergence(divergence: str, student_logits: Any, teacher_logits: Any, *,
                    temperature: float = 1.0, where: Any = None, **options) -> Array:
  """Any divergence of :data:`CORES` by name, from full logits (see the named functions)."""
  _, options = resolve_core(divergence, options)
  zs, zt = _common.check_logits_pair(student_logits, teacher_logits)
  temperature = _common.check_temperature(temperature)
  where = _common.check_where(where, zs.shape[:-1])
  values = divergence_values(divergence, _common.mask_rows(zs, where),
                             _common.mask_rows(zt, where), temperature=temperature,
                             options=options)
  return _common.apply_where(values, where)


# ----------------------------------------------------------------------------------------------
# Public, documented functions.
# ----------------------------------------------------------------------------------------------

def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               where: Array | None = None) -> Array:
  r"""Forward KL divergence ``KL(p || q)`` per position (classic, mode-covering KD).

  .. math:: T^2 \sum_v p_v (\log p_v - \log q_v),\quad p = \mathrm{softmax}(z_t/T),\
            q = \mathrm{softmax}(z_s/T)

  Args:
    student_logits: ``[..., vocab]`` student logits (any float dtype; computed in float32).
    teacher_logits: ``[..., vocab]`` teacher logits, same shape.
    temperature: softmax temperature ``T > 0``; the result is multiplied by ``T**2``.
    where: optional boolean ``[...]``; positions where it is False give 0.

  Returns:
    ``[...]`` float32 divergences.

  References: Hinton et al., *Distilling the Knowledge in a Neural Network*, 2015.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[1.0, 2.0, 3.0]])
  >>> float(forward_kl(z, z)[0])
  0.0
  """
  return full_divergence("forward_kl", student_logits, teacher_logits,
                         temperature=temperature, where=where)


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               where: Array | None = None) -> Array:
  r"""Reverse KL divergence ``KL(q || p)`` per position (mode-seeking; MiniLLM's token form).

  .. math:: T^2 \sum_v q_v (\log q_v - \log p_v)

  Args and returns as :func:`forward_kl`.

  References: Gu et al., *MiniLLM: Knowledge Distillation of Large Language Models*, 2024.

  >>> import jax.numpy as jnp
  >>> round(float(reverse_kl(jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0]))), 4)
  0.1201
  """
  return full_divergence("reverse_kl", student_logits, teacher_logits,
                         temperature=temperature, where=where)


def generalized_jsd(student_logits: Array, teacher_logits: Array, *, beta: float = 0.5,
                    temperature: float = 1.0, where: Array | None = None) -> Array:
  r"""Generalized Jensen-Shannon divergence (GKD) per position.

  .. math:: m = \beta p + (1-\beta) q,\quad
            T^2 [\beta\,\mathrm{KL}(p\|m) + (1-\beta)\,\mathrm{KL}(q\|m)]

  As in TRL, ``beta=0`` is *defined* as forward KL and ``beta=1`` as reverse KL (the formula
  itself tends to 0 at both ends). The mixture is formed in log space.

  Args:
    beta: mixture weight of the teacher, in [0, 1]; 0.5 is the symmetric JSD.
    Others as :func:`forward_kl`.

  References: Agarwal et al., *On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes* (GKD), ICLR 2024.

  >>> import jax.numpy as jnp
  >>> s, t = jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0])
  >>> bool(jnp.allclose(generalized_jsd(s, t, beta=0.0), forward_kl(s, t)))
  True
  """
  return full_divergence("generalized_jsd", student_logits, teacher_logits, beta=beta,
                         temperature=temperature, where=where)


def skew_kl(student_logits: Array, teacher_logits: Array, *, alpha: float = 0.1,
            temperature: float = 1.0, where: Array | None = None) -> Array:
  r"""Skew KL divergence ``KL(p || alpha p + (1 - alpha) q)`` per position (DistiLLM).

  The gradient flows through the student part of the mixture. ``alpha=0`` is forward KL.

  Args:
    alpha: teacher weight in the mixture, in [0, 1] (0.1 in DistiLLM).
    Others as :func:`forward_kl`.

  References: Ko et al., *DistiLLM: Towards Streamlined Distillation for LLMs*, ICML 2024.

  >>> import jax.numpy as jnp
  >>> s, t = jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0])
  >>> bool(skew_kl(s, t, alpha=0.1) < forward_kl(s, t))
  True
  """
  return full_divergence("skew_kl", student_logits, teacher_logits, alpha=alpha,
                         temperature=temperature, where=where)


def skew_reverse_kl(student_logits: Array, teacher_logits: Array, *, alpha: float = 0.1,
                    temperature: float = 1.0, where: Array | None = None) -> Array:
  r"""Skew reverse KL ``KL(q || (1 - alpha) p + alpha q)`` per position (DistiLLM).

  ``alpha=0`` is reverse KL.

  Args:
    alpha: student weight in the mixture, in [0, 1] (0.1 in DistiLLM).
    Others as :func:`forward_kl`.

  References: Ko et al., *DistiLLM*, ICML 2024.

  >>> import jax.numpy as jnp
  >>> s, t = jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0])
  >>> bool(jnp.allclose(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t)))
  True
  """
  return full_divergence("skew_reverse_kl", student_logits, teacher_logits, alpha=alpha,
                         temperature=temperature, where=where)


def total_variation(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
                    where: Array | None = None) -> Array:
  r"""Total variation distance ``0.5 * sum |p - q|`` per position, times ``T**2``.

  Bounded in ``[0, T**2]``.

  References: Wen et al., *f-Divergence Minimization for Sequence-Level KD*, ACL 2023.

  >>> import jax.numpy as jnp
  >>> float(total_variation(jnp.array([0.0, -jnp.inf]), jnp.array([-jnp.inf, 0.0])))
  1.0
  """
  return full_divergence("total_variation", student_logits, teacher_logits,
                         temperature=temperature, where=where)


def adaptive_kl(student_logits: Array, teacher_logits: Array, *, mu: float = 0.5,
                temperature: float = 1.0, where: Array | None = None) -> Array:
  r"""Adaptive KL (AKL): forward and reverse KL weighted by the head/tail gaps.

  The head is the teacher's most likely tokens, taken in order of probability until their
  cumulative probability reaches ``mu`` (the crossing token included; tokens tied with the
  last head token are in the head too); the tail is the rest.

  .. math:: g_h = \sum_{head} |p - q|,\ g_t = \sum_{tail} |p - q|,\quad
            T^2\,[\tfrac{g_h}{g_h+g_t}\mathrm{KL}(p\|q) + \tfrac{g_t}{g_h+g_t}\mathrm{KL}(q\|p)]

  The weights are constants for the gradient (stop-gradient). Unlike the reference code, the
  head mask is applied to the same (unsorted) tokens it was computed for.

  Args:
    mu: cumulative teacher probability of the head, in (0, 1].
    Others as :func:`forward_kl`.

  References: Wu et al., *Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
  Large Language Models*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([1.0, 2.0, 3.0])
  >>> float(adaptive_kl(z, z))
  0.0
  """
  return full_divergence("adaptive_kl", student_logits, teacher_logits, mu=mu,
                         temperature=temperature, where=where)


def balanced_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
                where: Array | None = None) -> Array:
  r"""Balanced divergence (BD-KD): forward and reverse KL weighted by the two entropies.

  Per position, the teacher's entropy weights the forward (mode-covering) KL and the student's
  entropy the reverse (mode-seeking) KL, normalised to sum to 1:

  .. math:: H(x) = -\sum_v x_v \log x_v,\quad
            w_f = \frac{H(p)}{H(p) + H(q)},\ w_r = \frac{H(q)}{H(p) + H(q)},\quad
            T^2\,[w_f\,\mathrm{KL}(p\|q) + w_r\,\mathrm{KL}(q\|p)]

  A student less certain than the teacher (``H(q) > H(p)``) leans on reverse KL, which
  sharpens it; a more certain (over-confident) one leans on forward KL, which spreads it. The
  weights are constants for the gradient (stop-gradient); both entropies are of the tempered
  distributions; when both are 0 the weights are 1/2 each. Over sparse bins
  (:func:`jkd.losses.sparse_divergence`) the entropies are those of the binned distributions.

  Args and returns as :func:`forward_kl`.

  References: Amara et al., *BD-KD: Balancing the Divergences for Online Knowledge
  Distillation*, arXiv:2212.12965, 2022.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([1.0, 2.0, 3.0])
  >>> float(balanced_kl(z, z))
  0.0
  >>> s, t = jnp.zeros(3), jnp.array([2.0, 0.0, -1.0])  # a uniform student: H(q) > H(p)
  >>> f, r, b = forward_kl(s, t), reverse_kl(s, t), balanced_kl(s, t)
  >>> bool(min(f, r) < b < max(f, r)), bool(abs(b - r) < abs(b - f))
  (True, True)
  """
  return full_divergence("balanced_kl", student_logits, teacher_logits,
                         temperature=temperature, where=where)


def taid_kl(student_logits: Array, teacher_logits: Array, *, t: Any, temperature: float = 1.0,
            where: Array | None = None) -> Array:
  r"""TAID's loss: KL from the interpolated target to the student, per position.

  .. math:: p_t = \mathrm{softmax}\big(((1-t)\,\mathrm{sg}(z_s) + t\,z_t)/T\big),\quad
            T^2\,\mathrm{KL}(p_t \| q)

  ``t`` (scalar, may be traced) comes from :func:`jkd.losses.taid_update`; ``t = 1`` is
  forward KL. No gradient flows through the student part of the target.

  References: Shing et al., *TAID: Temporally Adaptive Interpolated Distillation for Efficient
  Knowledge Transfer in Language Models*, ICLR 2025.

  >>> import jax.numpy as jnp
  >>> s, t = jnp.array([0.0, 0.0]), jnp.array([0.0, 1.0])
  >>> bool(jnp.allclose(taid_kl(s, t, t=1.0), forward_kl(s, t)))
  True
  """
  return full_divergence("taid", student_logits, teacher_logits, t=t, temperature=temperature,
                         where=where)


#: Public full-logit divergences by name.
DIVERGENCES: dict[str, Callable[..., Array]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "adaptive_kl": adaptive_kl,
    "balanced_kl": balanced_kl,
    "taid": taid_kl,
}
