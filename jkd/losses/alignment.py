"""Reference-free and distillation-flavoured preference losses, metrics, and loss combinations.

SimPO, CPO, ORPO, KTO and REDI need no reference model; DCKD and ADPA distil an aligned teacher
at the token level. :func:`preference_loss` combines any of TRL's DPO loss types with weights
(TRL's ``loss_type`` list), and :func:`preference_metrics` gives the standard metrics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import preference
from jkd.losses import sparse
from jkd.losses import tokens

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Reference-free losses.
# ----------------------------------------------------------------------------------------------

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
  pc, pr = preference._as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = preference._beta(beta)
  ratio = float(gamma_beta_ratio)
  if not math.isfinite(ratio):
    raise ValueError(f"gamma_beta_ratio must be finite (got {gamma_beta_ratio}).")
  e = preference._smoothing(label_smoothing, high=0.5, inclusive=True)
  x = beta * (pc - pr) - beta * ratio
  return preference._smoothed_sigmoid(x, e)


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
  pc, pr = preference._as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = preference._beta(beta)
  e = preference._smoothing(label_smoothing, high=0.5, inclusive=True)
  loss = preference._smoothed_sigmoid(beta * (pc - pr), e)
  if chosen_nll is not None:
    (nll,) = preference._as_logps(chosen_nll, names=("chosen_nll",))
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
  lc, lr = preference._as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  lc = jnp.minimum(lc, -1e-7)
  lr = jnp.minimum(lr, -1e-7)
  return (lc - lr) - (preference._log1mexp(lc) - preference._log1mexp(lr))


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
  lc, _ = preference._as_logps(policy_chosen_logps, policy_rejected_logps,
                               names=("policy_chosen_logps", "policy_rejected_logps"))
  lam = _common.check_positive(lam, "lam") if lam != 0 else 0.0
  ratio = orpo_log_odds_ratio(policy_chosen_logps, policy_rejected_logps)
  nll = -lc if chosen_nll is None else preference._as_logps(
      policy_chosen_logps, chosen_nll, names=("policy_chosen_logps", "chosen_nll"))[1]
  return nll - lam * jax.nn.log_sigmoid(ratio)


def kto_kl_estimate(policy_kl_logps: Array, ref_kl_logps: Array) -> Array:
  r"""KTO's reference point ``z = sg(max(0, mean(policy - ref)))`` from mismatched pairs.

  The log-probs are of completions paired with *other* prompts of the batch (e.g. shift the
  completions by one), giving a batch estimate of ``KL(policy || ref)``.

  >>> import jax.numpy as jnp
  >>> float(kto_kl_estimate(jnp.array([-1.0, -3.0]), jnp.array([-2.0, -2.0])))
  0.0
  """
  p, r = preference._as_logps(policy_kl_logps, ref_kl_logps,
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
  p, r = preference._as_logps(policy_logps, ref_logps, names=("policy_logps", "ref_logps"))
  desirable = jnp.asarray(desirable)
  if desirable.shape != p.shape or desirable.dtype != jnp.bool_:
    raise ValueError(f"desirable must be a bool array of shape {p.shape} (got"
                     f" {desirable.dtype}{list(desirable.shape)}).")
  beta = preference._beta(beta)
  z = jax.lax.stop_gradient(jnp.asarray(kl, jnp.float32))
  ratio = p - r
  good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (ratio - z)))
  bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - ratio)))
  return jnp.where(desirable, good, bad)


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
  pos, neg = preference._as_logps(positive_logps, negative_logps,
                                  names=("positive_logps", "negative_logps"))
  return -float(c_pos) * pos + float(c_neg) * neg


# ----------------------------------------------------------------------------------------------
# Distillation-flavoured preference losses.
# ----------------------------------------------------------------------------------------------

class SparseTeacher(NamedTuple):
  """A teacher's top-k ids and log-probs ``[B, T, k]`` (optionally its tail log-mass)."""
  ids: Array
  logprobs: Array
  tail_logprob: Array | None = None


def dckd_loss(chosen_logits: Array, chosen_labels: Array, chosen_teacher: SparseTeacher,
              rejected_logits: Array, rejected_labels: Array, rejected_teacher: SparseTeacher,
              *, kd_weight: float = 0.1, tail: bool = True) -> Array:
  r"""DCKD: NLL of the chosen completion plus top-k forward KL to a DPO-aligned teacher on both.

  .. math:: \mathrm{NLL}(y_w) + w\,[\mathrm{FKL}_{top\text{-}k}(p \| q; y_w) +
            \mathrm{FKL}_{top\text{-}k}(p \| q; y_l)]

  each term a per-sequence token mean over the completion tokens (``labels != -100``).

  Args:
    chosen_logits, rejected_logits: ``[B, T, V]`` student logits.
    chosen_labels, rejected_labels: ``[B, T]`` ids, ``-100`` off the completion.
    chosen_teacher, rejected_teacher: :class:`SparseTeacher` of the aligned teacher (top-50
      plus the tail bin in the paper).
    kd_weight: ``w`` (0.1). tail: use the tail bin.

  Returns:
    ``[B]`` per-pair losses.

  References: Gao et al., *Advantage-Guided Distillation for Preference Alignment in Small
  Language Models* (DCKD and ADPA), ICLR 2025, arXiv:2502.17927 (docs/methods.md §10.1).
  """
  w = float(kd_weight)

  def fkl(logits, labels, teacher):
    mask = tokens.label_mask(labels)
    values = sparse.sparse_divergence(logits, teacher.ids, teacher.logprobs,
                                      divergence="forward_kl", tail=tail,
                                      teacher_tail_logprob=teacher.tail_logprob, where=mask)
    return tokens.sequence_mean(values, mask), mask

  kd_c, mask_c = fkl(chosen_logits, chosen_labels, chosen_teacher)
  kd_r, _ = fkl(rejected_logits, rejected_labels, rejected_teacher)
  nll = -preference.sequence_logprobs(chosen_logits, chosen_labels).mean
  return nll + w * (kd_c + kd_r)


def adpa_advantage_loss(student_logits: Array, teacher_ids: Array, teacher_logprobs: Array,
                        teacher_ref_logprobs: Array, *, where: Array | None = None) -> Array:
  r"""ADPA's advantage term per token: ``-sum_{a in topK} q(a|s) A(s, a)``.

  .. math:: A(s, a) = \log\pi_{teacher}(a|s) - \log\pi_{teacher\,ref}(a|s)

  over the aligned teacher's top-k tokens (k = 50 in the paper), on student-generated
  responses. The full ADPA objective is ``NLL(y_w) + w * masked_mean(this)`` (``w = 1.6``).

  Args:
    student_logits: ``[B, T, V]`` student logits on its own responses.
    teacher_ids: ``[B, T, k]`` the aligned teacher's top-k ids.
    teacher_logprobs: ``[B, T, k]`` the aligned teacher's log-probs at those ids.
    teacher_ref_logprobs: ``[B, T, k]`` the teacher's reference (pre-alignment) log-probs there.
    where: optional ``[B, T]`` mask.

  Returns:
    ``[B, T]`` per-token values, 0 where masked.

  References: Gao et al., *Advantage-Guided Distillation for Preference Alignment in Small
  Language Models* (ADPA), ICLR 2025; code ``gaoshiping/ADPA``.
  """
  zs = _common.check_float_array(student_logits, "student_logits")
  lp = _common.check_float_array(teacher_logprobs, "teacher_logprobs")
  lr = _common.check_float_array(teacher_ref_logprobs, "teacher_ref_logprobs")
  ids_shape = jnp.shape(teacher_ids)
  if ids_shape[:-1] != zs.shape[:-1] or lp.shape != ids_shape or lr.shape != ids_shape:
    raise ValueError(f"teacher_ids {ids_shape}, teacher_logprobs {lp.shape} and"
                     f" teacher_ref_logprobs {lr.shape} must all be {zs.shape[:-1]} + (k,).")
  where = _common.check_where(where, zs.shape[:-1])
  if where is not None:
    # Double where: masked positions (padding) may hold anything (-inf log-probs, -100 ids,
    # NaN logits); neutral inputs there keep the gradient finite, not only the value.
    zs, lp, lr = (_common.mask_rows(x, where) for x in (zs, lp, lr))
    teacher_ids = jnp.where(where[..., None], teacher_ids, 0)
  ids = _common.check_ids(teacher_ids, zs.shape[-1], "teacher_ids")
  q = jnp.exp(jnp.take_along_axis(_common.log_softmax_t(zs, 1.0), ids.astype(jnp.int32),
                                  axis=-1, mode="fill", fill_value=jnp.nan))
  advantage = jax.lax.stop_gradient(lp.astype(jnp.float32) - lr.astype(jnp.float32))
  return _common.apply_where(-jnp.sum(q * advantage, axis=-1), where)


# ----------------------------------------------------------------------------------------------
# Combinations and metrics.
# ----------------------------------------------------------------------------------------------

#: TRL's DPO loss types: functions of ``(pc, pr, rc, rr, **options)``, and whether they take
#: length-averaged log-probs.
PREFERENCE_LOSSES: dict[str, tuple[Callable[..., Array], bool]] = {
    "sigmoid": (preference.dpo_loss, False),
    "robust": (preference.robust_dpo_loss, False),
    "ipo": (preference.ipo_loss, True),
    "hinge": (preference.hinge_loss, False),
    "exo_pair": (preference.exo_pair_loss, False),
    "nca_pair": (preference.nca_pair_loss, False),
    "bco_pair": (preference.bco_pair_loss, False),
    "sppo_hard": (preference.sppo_hard_loss, False),
    "aot": (preference.aot_loss, False),
    "aot_unpaired": (preference.aot_unpaired_loss, False),
    "apo_zero": (preference.apo_zero_loss, False),
    "apo_down": (preference.apo_down_loss, False),
    "discopop": (preference.discopop_loss, False),
    "sigmoid_norm": (preference.sigmoid_norm_loss, True),
    "sft": (preference.sft_loss, True),
}


def _pick(x: Any, averaged: bool, name: str) -> Array:
  if isinstance(x, preference.SequenceLogprobs):
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
  pc, pr = preference._as_logps(policy_chosen_logps, policy_rejected_logps,
                                names=("policy_chosen_logps", "policy_rejected_logps"))
  beta = preference._beta(beta)
  rc = jnp.zeros_like(pc) if ref_chosen_logps is None else ref_chosen_logps
  rr = jnp.zeros_like(pr) if ref_rejected_logps is None else ref_rejected_logps
  # The reference's log-probs must be [batch] like the policy's (no silent broadcasting).
  _, _, rc, rr = preference._as_logps(pc, pr, rc, rr, names=preference._FOUR)
  chosen = jax.lax.stop_gradient(beta * (pc - rc))
  rejected = jax.lax.stop_gradient(beta * (pr - rr))
  return {"rewards/chosen": jnp.mean(chosen), "rewards/rejected": jnp.mean(rejected),
          "rewards/margins": jnp.mean(chosen - rejected),
          "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
          "logps/chosen": jnp.mean(jax.lax.stop_gradient(pc)),
          "logps/rejected": jnp.mean(jax.lax.stop_gradient(pr))}
