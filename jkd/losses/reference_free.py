"""Preference losses without a reference model: SimPO, CPO, ORPO and REDI (docs/methods.md §9).

Inputs are per-sequence log-probabilities (:mod:`jkd.losses.sequences`), ``[batch]``; every loss
returns per-example values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import _pairs

Array = jax.Array


def simpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, *, beta: float = 2.0,
               gamma_beta_ratio: float = 0.25, label_smoothing: float = 0.0) -> Array:
  r"""SimPO: length-normalised, reference-free DPO with a target margin ``gamma``.

  .. math:: x = \beta(\bar{p}_c - \bar{p}_r) - \gamma,\ \gamma = \beta \cdot ratio,\quad
            -(1-e)\log\sigma(x) - e\log\sigma(-x)

  Args:
    policy_chosen_logps, policy_rejected_logps: ``[B]`` **length-averaged** log-probs.
    beta: reward scale (2.0). gamma_beta_ratio: ``gamma / beta`` (0.25).
    label_smoothing: ``e`` in [0, 0.5].

  References: Meng et al., *SimPO: Simple Preference Optimization with a Reference-Free Reward*,
  NeurIPS 2024.

  >>> import jax.numpy as jnp
  >>> round(float(simpo_loss(jnp.array([-1.0]), jnp.array([-1.25]))[0]), 4)  # -log s(0)
  0.6931
  """
  pc, pr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = _pairs.check_beta(beta)
  ratio = float(gamma_beta_ratio)
  if not math.isfinite(ratio):
    raise ValueError(f"gamma_beta_ratio must be finite (got {gamma_beta_ratio}).")
  e = _pairs.check_smoothing(label_smoothing, high=0.5, inclusive=True)
  x = beta * (pc - pr) - beta * ratio
  return _pairs.smoothed_sigmoid(x, e)


def cpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, *, beta: float = 0.1,
             label_smoothing: float = 0.0, chosen_nll: Array | None = None,
             alpha: float = 1.0) -> Array:
  r"""CPO: reference-free DPO plus a behaviour-cloning NLL on the chosen completion.

  .. math:: -(1-e)\log\sigma(\beta(p_c - p_r)) - e\log\sigma(-\beta(p_c - p_r))
            + \alpha\,\mathrm{NLL}(y_c)

  Args:
    policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs.
    beta: 0.1. label_smoothing: ``e``.
    chosen_nll: optional ``[B]`` NLL of the chosen completion (e.g. ``-SequenceLogprobs.mean``);
      omitted, the preference term alone is returned.
    alpha: weight of the NLL term (1.0).

  References: Xu et al., *Contrastive Preference Optimization*, ICML 2024.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([-1.0])
  >>> round(float(cpo_loss(x, x, chosen_nll=jnp.array([1.0]))[0]), 4)
  1.6931
  """
  pc, pr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = _pairs.check_beta(beta)
  e = _pairs.check_smoothing(label_smoothing, high=0.5, inclusive=True)
  loss = _pairs.smoothed_sigmoid(beta * (pc - pr), e)
  if chosen_nll is not None:
    (nll,) = _pairs.as_logps(chosen_nll, names=("chosen_nll",))
    if nll.shape != pc.shape:
      raise ValueError(f"chosen_nll shape {nll.shape} != log-probs shape {pc.shape}.")
    loss = loss + float(alpha) * nll
  return loss


def orpo_log_odds_ratio(policy_chosen_logps: Array, policy_rejected_logps: Array) -> Array:
  r"""``log odds(y_c) - log odds(y_r)`` with ``odds = p / (1 - p)`` of averaged log-probs.

  .. math:: (l_c - l_r) - (\log(1 - e^{l_c}) - \log(1 - e^{l_r}))

  Computed with a stable ``log(1 - exp(l))``; log-probs must be ``< 0`` (a probability of 1 has
  infinite odds): values above ``-1e-7`` are clipped there.
  """
  lc, lr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  lc = jnp.minimum(lc, -1e-7)
  lr = jnp.minimum(lr, -1e-7)
  return (lc - lr) - (_pairs.log1mexp(lc) - _pairs.log1mexp(lr))


def orpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, *, lam: float = 0.1,
              chosen_nll: Array | None = None) -> Array:
  r"""ORPO: NLL of the chosen completion plus an odds-ratio preference penalty.

  .. math:: \mathrm{NLL}(y_c) - \lambda \log\sigma(\log\mathrm{OR}),\quad
            \log\mathrm{OR} = \text{:func:`orpo_log_odds_ratio`}

  Args:
    policy_chosen_logps, policy_rejected_logps: ``[B]`` **length-averaged** log-probs.
    lam: weight of the odds-ratio term (0.1).
    chosen_nll: ``[B]`` NLL of the chosen completion; default ``-policy_chosen_logps`` (the
      per-token NLL, as in the paper).

  With equal chosen and rejected log-probs the penalty is ``lam * log 2``.

  References: Hong et al., *ORPO: Monolithic Preference Optimization without Reference Model*,
  EMNLP 2024.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([-1.0])
  >>> round(float(orpo_loss(x, x)[0]), 4)  # 1 + 0.1 log 2
  1.0693
  """
  lc, _ = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps,
                               names=("policy_chosen_logps", "policy_rejected_logps"))
  lam = _common.check_positive(lam, "lam") if lam != 0 else 0.0
  ratio = orpo_log_odds_ratio(policy_chosen_logps, policy_rejected_logps)
  nll = -lc if chosen_nll is None else _pairs.as_logps(
      policy_chosen_logps, chosen_nll, names=("policy_chosen_logps", "chosen_nll"))[1]
  return nll - lam * jax.nn.log_sigmoid(ratio)


def redi_loss(positive_logps: Array, negative_logps: Array, *, c_pos: float = 1.0,
              c_neg: float = 0.8) -> Array:
  r"""REDI: learn from the teacher's positive and negative traces, no reference.

  .. math:: -c_{+}\,\frac{\log p(y^+)}{|y^+|} + c_{-}\,\frac{\log p(y^-)}{|y^-|}

  Args:
    positive_logps, negative_logps: ``[B]`` **length-averaged** log-probs of the positive
      (correct) and negative (incorrect) teacher traces.
    c_pos, c_neg: weights (1.0 and 0.8).

  References: Xu et al., *Harnessing Negative Signals: Reinforcement Distillation from Teacher
  Data for LLM Reasoning* (REDI), 2025.

  >>> import jax.numpy as jnp
  >>> round(float(redi_loss(jnp.array([-1.0]), jnp.array([-2.0]))[0]), 4)
  -0.6
  """
  pos, neg = _pairs.as_logps(positive_logps, negative_logps,
                                  names=("positive_logps", "negative_logps"))
  return -float(c_pos) * pos + float(c_neg) * neg
