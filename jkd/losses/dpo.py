"""The DPO family: preference losses of a policy against a reference model, KTO, and the
combination of TRL's loss types.

Inputs are per-sequence log-probabilities of the completions, shape ``[batch]``
(:mod:`jkd.losses.sequences`): the policy's and the reference's, for the chosen and the rejected
completion of each pair. With ``h = (pc - rc) - (pr - rr)`` (the policy's log-ratio margin over
the reference's), every loss returns per-example values ``[batch]``; reduce them with
``jnp.mean``. Log-probs are *summed* over completion tokens unless a loss says it wants them
length-averaged: pass :attr:`~jkd.losses.SequenceLogprobs.mean` there. KTO takes unpaired
completions. :func:`preference_loss` combines any of TRL's DPO loss types with weights (TRL's
``loss_type`` list); :func:`preference_metrics` gives the implicit rewards ``beta * (pc - rc)``
and ``beta * (pr - rr)``, their margin and accuracy. Formulas: docs/methods.md §8-§9.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import _pairs
from jkd.losses import sequences

Array = jax.Array


def _margins(pc, pr, rc, rr):
  chosen = pc - rc
  rejected = pr - rr
  return chosen, rejected, chosen - rejected


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array, ref_chosen_logps: Array,
             ref_rejected_logps: Array, *, beta: float = 0.1,
             label_smoothing: float = 0.0) -> Array:
  r"""DPO (TRL ``sigmoid``); with label smoothing ``e`` it is conservative DPO (cDPO).

  .. math:: -(1-e)\log\sigma(\beta h) - e\log\sigma(-\beta h),\quad h = (p_c - r_c) - (p_r - r_r)

  Args:
    policy_chosen_logps, policy_rejected_logps: ``[B]`` summed log-probs of the policy.
    ref_chosen_logps, ref_rejected_logps: ``[B]`` summed log-probs of the reference.
    beta: inverse temperature ``> 0`` (0.1).
    label_smoothing: ``e`` in [0, 0.5], the assumed probability that a label is flipped.

  Returns:
    ``[B]`` per-pair losses.

  References: Rafailov et al., *Direct Preference Optimization*, NeurIPS 2023; Mitchell, *A
  note on DPO with noisy preferences* (cDPO), 2023.

  >>> import jax.numpy as jnp
  >>> round(float(dpo_loss(jnp.array([-1.0]), jnp.array([-1.0]), jnp.array([-1.0]), jnp.array([-1.0]))[0]), 4)
  0.6931
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  e = _pairs.check_smoothing(label_smoothing, high=0.5, inclusive=True)
  h = _margins(pc, pr, rc, rr)[2]
  return -(1 - e) * jax.nn.log_sigmoid(beta * h) - e * jax.nn.log_sigmoid(-beta * h)


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, *, beta: float = 0.1,
                    label_smoothing: float = 0.1) -> Array:
  r"""Robust DPO (rDPO, TRL ``robust``): an unbiased loss under label noise rate ``e``.

  .. math:: \frac{-(1-e)\log\sigma(\beta h) + e\log\sigma(-\beta h)}{1 - 2e},\quad e\in[0, 0.5)

  ``e = 0`` is DPO. References: Chowdhury et al., *Provably Robust DPO*, ICML 2024.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([-2.0]); y = jnp.array([-3.0])
  >>> bool(jnp.allclose(robust_dpo_loss(x, y, y, x, label_smoothing=0.0), dpo_loss(x, y, y, x)))
  True
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta, e = _pairs.check_beta(beta), _pairs.check_smoothing(label_smoothing, high=0.5)
  h = _margins(pc, pr, rc, rr)[2]
  return (-(1 - e) * jax.nn.log_sigmoid(beta * h) + e * jax.nn.log_sigmoid(-beta * h)) / (1 - 2 * e)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float = 0.1) -> Array:
  r"""IPO: ``(h - 1/(2 beta))**2`` on **length-averaged** log-probs (as TRL and the authors).

  Pass :attr:`SequenceLogprobs.mean` for all four. References: Azar et al., *A General
  Theoretical Paradigm to Understand Learning from Human Preferences*, AISTATS 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(ipo_loss(z, z, z, z, beta=0.5)[0])
  1.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  return (_margins(pc, pr, rc, rr)[2] - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               *, beta: float = 0.1) -> Array:
  r"""SLiC hinge loss ``relu(1 - beta * h)`` (TRL ``hinge``).

  References: Zhao et al., *SLiC-HF*, 2023.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(hinge_loss(z, z, z, z)[0])
  1.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  return jax.nn.relu(1.0 - _pairs.check_beta(beta) * _margins(pc, pr, rc, rr)[2])


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1,
                  label_smoothing: float = 1e-3) -> Array:
  r"""EXO (TRL ``exo_pair``): ``KL(p_theta || p_label)`` over {chosen, rejected}.

  .. math:: \sigma(\beta h)[\log\sigma(\beta h) - \log(1-e)] +
            \sigma(-\beta h)[\log\sigma(-\beta h) - \log e],\quad e \in (0, 1)

  References: Ji et al., *Towards Efficient Exact Optimization of Language Model Alignment*,
  ICML 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(exo_pair_loss(z, z, z, z, label_smoothing=0.5)[0])
  0.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  e = _common.check_unit_interval(label_smoothing, "label_smoothing", open_low=True,
                                  open_high=True)
  x = beta * _margins(pc, pr, rc, rr)[2]
  return (jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - math.log1p(-e))
          + jax.nn.sigmoid(-x) * (jax.nn.log_sigmoid(-x) - math.log(e)))


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""NCA (TRL ``nca_pair``) with rewards ``r_c = beta (pc - rc)``, ``r_r = beta (pr - rr)``.

  .. math:: -\log\sigma(r_c) - \tfrac12\log\sigma(-r_c) - \tfrac12\log\sigma(-r_r)

  References: Chen et al., *Noise Contrastive Alignment of Language Models*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> round(float(nca_pair_loss(z, z, z, z)[0]), 4)  # 2 log 2
  1.3863
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  chosen, rejected, _ = _margins(pc, pr, rc, rr)
  rc_, rr_ = beta * chosen, beta * rejected
  return (-jax.nn.log_sigmoid(rc_) - 0.5 * jax.nn.log_sigmoid(-rc_)
          - 0.5 * jax.nn.log_sigmoid(-rr_))


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1, delta: Any = 0.0) -> Array:
  r"""BCO (TRL ``bco_pair``): binary classification of chosen vs rejected rewards.

  .. math:: -\log\sigma(\beta(p_c - r_c) - \delta) - \log\sigma(-(\beta(p_r - r_r) - \delta))

  ``delta`` is the reward shift (BCO keeps a running mean of the rewards; pass it, or 0 as in
  current TRL). References: Jung et al., *Binary Classifier Optimization*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> round(float(bco_pair_loss(z, z, z, z)[0]), 4)
  1.3863
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  chosen, rejected, _ = _margins(pc, pr, rc, rr)
  delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
  return (-jax.nn.log_sigmoid(beta * chosen - delta)
          - jax.nn.log_sigmoid(-(beta * rejected - delta)))


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                   ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""SPPO with hard labels (TRL ``sppo_hard``).

  .. math:: (p_c - r_c - \tfrac{1}{2\beta})^2 + (p_r - r_r + \tfrac{1}{2\beta})^2

  References: Wu et al., *Self-Play Preference Optimization*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(sppo_hard_loss(z, z, z, z, beta=0.5)[0])
  2.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  chosen, rejected, _ = _margins(pc, pr, rc, rr)
  return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def aot_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta: float = 0.1, label_smoothing: float = 0.0) -> Array:
  r"""AOT, paired (TRL ``aot``): distributional alignment via sorted log-ratio margins.

  ``d = sort_batch(pc - pr) - sort_batch(rc - rr)``; loss ``-(1-e) log s(beta d) - e log
  s(-beta d)``. The sort is over the batch, so element ``i`` of the output is the ``i``-th
  quantile, not pair ``i``. References: Melnyk et al., *Distributional Preference Alignment of
  LLMs via Optimal Transport*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(2)
  >>> round(float(aot_loss(z, z, z, z)[0]), 4)
  0.6931
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  e = _pairs.check_smoothing(label_smoothing, high=0.5, inclusive=True)
  d = jnp.sort(pc - pr) - jnp.sort(rc - rr)
  return _pairs.smoothed_sigmoid(beta * d, e)


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, *, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> Array:
  r"""AOT, unpaired (TRL ``aot_unpaired``): ``d = sort(pc - rc) - sort(pr - rr)`` over the batch.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(2)
  >>> round(float(aot_unpaired_loss(z, z, z, z)[1]), 4)
  0.6931
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  e = _pairs.check_smoothing(label_smoothing, high=0.5, inclusive=True)
  d = jnp.sort(pc - rc) - jnp.sort(pr - rr)
  return _pairs.smoothed_sigmoid(beta * d, e)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""APO-zero (TRL ``apo_zero``): raise chosen and lower rejected likelihood vs the anchor.

  .. math:: 1 - \sigma(\beta(p_c - r_c)) + \sigma(\beta(p_r - r_r))

  References: D'Oosterlinck et al., *Anchored Preference Optimization*, 2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(apo_zero_loss(z, z, z, z)[0])
  1.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  chosen, rejected, _ = _margins(pc, pr, rc, rr)
  return 1.0 - jax.nn.sigmoid(beta * chosen) + jax.nn.sigmoid(beta * rejected)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""APO-down (TRL ``apo_down``): lower both, rejected more.

  .. math:: \sigma(\beta(p_c - r_c)) + 1 - \sigma(\beta h)

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> float(apo_down_loss(z, z, z, z)[0])
  1.0
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta = _pairs.check_beta(beta)
  chosen, _, h = _margins(pc, pr, rc, rr)
  return jax.nn.sigmoid(beta * chosen) + 1.0 - jax.nn.sigmoid(beta * h)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                  ref_rejected_logps, *, beta: float = 0.1, tau: float = 0.05) -> Array:
  r"""DiscoPOP (TRL ``discopop``): log-ratio-modulated mix of logistic and exponential losses.

  .. math:: x = \beta h,\ m = \sigma(x / \tau),\quad -\log\sigma(x)(1 - m) + e^{-x} m

  References: Chris Lu et al., *Discovering Preference Optimization Algorithms with and for LLMs*,
  2024.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> round(float(discopop_loss(z, z, z, z)[0]), 4)  # (log 2 + 1) / 2
  0.8466
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  beta, tau = _pairs.check_beta(beta), _common.check_positive(tau, "tau")
  x = beta * _margins(pc, pr, rc, rr)[2]
  # (1 - m) = s(-x / tau), and e^-x m = exp(-x + log s(x / tau)): the product form overflows to
  # inf * 0 = NaN for a large negative x (value and gradient).
  return (-jax.nn.log_sigmoid(x) * jax.nn.sigmoid(-x / tau)
          + jnp.exp(-x + jax.nn.log_sigmoid(x / tau)))


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, *, beta: float = 0.1) -> Array:
  r"""Length-normalised DPO (TRL ``sigmoid_norm``): ``-log s(beta h)`` on averaged log-probs.

  Pass :attr:`SequenceLogprobs.mean` for all four (the log-ratios divided by the completion
  lengths).

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(1)
  >>> round(float(sigmoid_norm_loss(z, z, z, z)[0]), 4)
  0.6931
  """
  pc, pr, rc, rr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_pairs.FOUR)
  return -jax.nn.log_sigmoid(_pairs.check_beta(beta) * _margins(pc, pr, rc, rr)[2])


def sft_loss(policy_chosen_logps, policy_rejected_logps=None, ref_chosen_logps=None,
             ref_rejected_logps=None) -> Array:
  r"""SFT on the chosen completion (TRL ``sft``): ``-log p(y_c|x)`` per pair.

  Pass the length-averaged log-probs for the per-token NLL. The other arguments are accepted
  (and ignored) so that ``sft`` combines with the other loss types.

  >>> import jax.numpy as jnp
  >>> float(sft_loss(jnp.array([-2.0]))[0])
  2.0
  """
  del policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
  (pc,) = _pairs.as_logps(policy_chosen_logps, names=("policy_chosen_logps",))
  return -pc


def kto_kl_estimate(policy_kl_logps: Array, ref_kl_logps: Array) -> Array:
  r"""KTO's reference point ``z = sg(max(0, mean(policy - ref)))`` from mismatched pairs.

  The log-probs are of completions paired with *other* prompts of the batch (e.g. shift the
  completions by one), giving a batch estimate of ``KL(policy || ref)``.

  >>> import jax.numpy as jnp
  >>> float(kto_kl_estimate(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0])))
  0.0
  """
  p, r = _pairs.as_logps(policy_kl_logps, ref_kl_logps,
                              names=("policy_kl_logps", "ref_kl_logps"))
  return jax.lax.stop_gradient(jnp.maximum(jnp.mean(p - r), 0.0))


def kto_loss(policy_logps: Array, ref_logps: Array, desirable: Array, *, kl: Array,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Array:
  r"""KTO: prospect-theoretic loss on unpaired desirable/undesirable completions.

  .. math:: r = p - p_{ref};\quad \lambda_D (1 - \sigma(\beta(r - z)))\ \text{if desirable},\quad
            \lambda_U (1 - \sigma(\beta(z - r)))\ \text{otherwise}

  Args:
    policy_logps, ref_logps: ``[B]`` summed log-probs of each completion.
    desirable: ``[B]`` bool, True for a desirable (chosen) completion.
    kl: the reference point ``z`` (scalar), from :func:`kto_kl_estimate`.
    beta: 0.1. desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U`` (1.0).

  References: Ethayarajh et al., *KTO: Model Alignment as Prospect Theoretic Optimization*,
  ICML 2024.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([-1.0, -1.0])
  >>> kto_loss(x, x, jnp.array([True, False]), kl=0.0).tolist()
  [0.5, 0.5]
  """
  p, r = _pairs.as_logps(policy_logps, ref_logps, names=("policy_logps", "ref_logps"))
  desirable = jnp.asarray(desirable)
  if desirable.shape != p.shape or desirable.dtype != jnp.bool_:
    raise ValueError(f"desirable must be a bool array of shape {p.shape} (got"
                     f" {desirable.dtype}{list(desirable.shape)}).")
  beta = _pairs.check_beta(beta)
  z = jax.lax.stop_gradient(jnp.asarray(kl, jnp.float32))
  ratio = p - r
  good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio - z)))
  bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - ratio)))
  return jnp.where(desirable, good, bad)


#: TRL's DPO loss types: functions of ``(pc, pr, rc, rr, **options)``, and whether they take
#: length-averaged log-probs.
PREFERENCE_LOSSES: dict[str, tuple[Callable[..., Array], bool]] = {
    "sigmoid": (dpo_loss, False),
    "robust": (robust_dpo_loss, False),
    "ipo": (ipo_loss, True),
    "hinge": (hinge_loss, False),
    "exo_pair": (exo_pair_loss, False),
    "nca_pair": (nca_pair_loss, False),
    "bco_pair": (bco_pair_loss, False),
    "sppo_hard": (sppo_hard_loss, False),
    "aot": (aot_loss, False),
    "aot_unpaired": (aot_unpaired_loss, False),
    "apo_zero": (apo_zero_loss, False),
    "apo_down": (apo_down_loss, False),
    "discopop": (discopop_loss, False),
    "sigmoid_norm": (sigmoid_norm_loss, True),
    "sft": (sft_loss, True),
}


def _pick(x: Any, averaged: bool, name: str) -> Array:
  if isinstance(x, sequences.SequenceLogprobs):
    return x.mean if averaged else x.sum
  if averaged:
    raise TypeError(f"{name}: this loss type needs length-averaged log-probs; pass the"
                    " SequenceLogprobs from sequence_logprobs (not a plain array).")
  return x


def preference_loss(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any,
                    *, loss_type: str | Sequence[str] = "sigmoid",
                    loss_weights: Sequence[float] | None = None,
                    options: Mapping[str, Mapping[str, Any]] | None = None,
                    **shared_options: Any) -> Array:
  """One or a weighted sum of TRL's DPO loss types, per pair.

  Args:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected: :class:`SequenceLogprobs` (each
      type picks summed or averaged log-probs as it needs), or ``[B]`` summed log-probs.
    loss_type: a name of :data:`PREFERENCE_LOSSES`, or a list of them (TRL's list form).
    loss_weights: one weight per type (default all 1).
    options: per-type options, e.g. ``{"robust": {"label_smoothing": 0.1}}``.
    **shared_options: options given to every type that takes them (e.g. ``beta=0.1``).

  Returns:
    ``[B]`` per-pair losses.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(2)
  >>> loss = preference_loss(z, z, z, z, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5])
  >>> [round(v, 4) for v in loss.tolist()]
  [1.1931, 1.1931]
  """
  import inspect
  types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
  if not types:
    raise ValueError("loss_type is empty: give at least one of " f"{sorted(PREFERENCE_LOSSES)}.")
  weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
  if len(weights) != len(types):
    raise ValueError(f"{len(weights)} loss_weights for {len(types)} loss types {types}.")
  options = dict(options or {})
  unknown = set(options) - set(types)
  if unknown:
    raise ValueError(f"options given for {sorted(unknown)}, which are not in loss_type {types}.")
  total = None
  for name, weight in zip(types, weights):
    if name not in PREFERENCE_LOSSES:
      near = _common.nearest_names(str(name), PREFERENCE_LOSSES)
      raise ValueError(f"unknown preference loss type {name!r}"
                       + (f" (did you mean {near[0]!r}?)" if near else "")
                       + f"; choose from {sorted(PREFERENCE_LOSSES)}.")
    fn, averaged = PREFERENCE_LOSSES[name]
    accepted = {n for n, p in inspect.signature(fn).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    kwargs = {k: v for k, v in shared_options.items() if k in accepted}
    own = dict(options.get(name, {}))
    bad = set(own) - accepted
    if bad:
      raise ValueError(f"loss type {name!r} takes no option(s) {sorted(bad)}; its options are"
                       f" {sorted(accepted)}.")
    kwargs.update(own)
    args = [_pick(x, averaged, name) for x in (policy_chosen, policy_rejected, ref_chosen,
                                               ref_rejected)]
    value = weight * fn(*args, **kwargs)
    total = value if total is None else total + value
  return total


def preference_metrics(policy_chosen_logps: Array, policy_rejected_logps: Array,
                       ref_chosen_logps: Array | None = None,
                       ref_rejected_logps: Array | None = None, *,
                       beta: float = 0.1) -> dict[str, Array]:
  """The standard preference metrics, batch means (namespaced for logging).

  ``rewards/chosen = beta (pc - rc)``, ``rewards/rejected = beta (pr - rr)``, their margin and
  accuracy (fraction of pairs with chosen reward > rejected), and the log-probs themselves.
  Without a reference (SimPO, ORPO, ...) the rewards are ``beta * logps``.

  >>> import jax.numpy as jnp
  >>> m = preference_metrics(jnp.array([-1.0, -2.0]), jnp.array([-2.0, -1.0]))
  >>> float(m["rewards/accuracies"])
  0.5
  """
  pc, pr = _pairs.as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = _pairs.check_beta(beta)
  rc = jnp.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
  rr = jnp.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
  # The reference's log-probs must be [batch] like the policy's (no silent broadcasting).
  _, _, rc, rr = _pairs.as_logps(pc, pr, rc, rr, names=_pairs.FOUR)
  chosen = jax.lax.stop_gradient(beta * (pc - rc))
  rejected = jax.lax.stop_gradient(beta * (pr - rr))
  return {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
          "rewards/margins": jnp.mean(chosen - rejected),
          "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
          "logps/chosen": jnp.mean(jax.lax.stop_gradient(pc)),
          "logps/rejected": jnp.mean(jax.lax.stop_gradient(pr))}
