"""Objective terms for preference training (registered in :data:`jkd.losses.LOSS_TERMS`).

The batch gives per-sequence log-probs, computed by the train step from the policy and the
reference (or the teacher as reference, LLaVA-MoD style) with
:func:`jkd.losses.sequence_logprobs` or :func:`jkd.losses.fused_sequence_logprobs`:

====================  ======================================================================
``policy_chosen``     :class:`~jkd.losses.SequenceLogprobs` of the chosen completions
``policy_rejected``   ... of the rejected completions
``ref_chosen``        reference (or teacher) log-probs of the chosen completions
``ref_rejected``      ... of the rejected completions
``policy``/``ref``    KTO: log-probs of unpaired completions; ``desirable`` ``[B]`` bool;
                      ``policy_kl``/``ref_kl``: the same completions on mismatched prompts
``policy_list``       TPO: log-probs of ``K`` ranked responses per prompt, ``[B, K]`` fields;
                      ``ref_list`` the reference's; ``list_scores`` ``[B, K]`` float;
                      ``list_mask`` ``[B, K]`` bool (True where a response is present)
====================  ======================================================================

Each term returns the mean loss over pairs and the standard metrics (``<name>/rewards/...``).
Every term takes ``fused=False``: the train step then computes the log-probs from hidden states
and the output head, chunked over tokens (:func:`jkd.losses.fused_sequence_logprobs`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jkd.losses import aligned_teacher
from jkd.losses import dpo
from jkd.losses import listwise
from jkd.losses import reference_free
from jkd.losses import sequences
from jkd.losses.tokens import IGNORE_INDEX
from jkd.losses.objective import register_loss_term

_PAIRS = (("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),)
_FREE = (("policy_chosen", "policy_rejected"),)
_LISTS = (("policy_list", "ref_list", "list_scores", "list_mask"),)


def _dummy_inputs() -> dict[str, Any]:
  lp = sequences.SequenceLogprobs(sum=-jnp.ones((2,)), mean=-jnp.ones((2,)) / 2,
                                   count=jnp.full((2,), 2))
  lists = sequences.SequenceLogprobs(sum=-jnp.ones((1, 2)), mean=-jnp.ones((1, 2)) / 2,
                                     count=jnp.full((1, 2), 2))
  return {"policy_chosen": lp, "policy_rejected": lp, "ref_chosen": lp, "ref_rejected": lp,
          "policy": lp, "ref": lp, "policy_kl": lp, "ref_kl": lp,
          "desirable": jnp.array([True, False]), "policy_list": lists, "ref_list": lists,
          "list_scores": jnp.array([[1.0, 0.0]]), "list_mask": jnp.ones((1, 2), bool)}


def _register(name, needs):
  """Registers a term whose options are checked at build time on a tiny dummy batch."""
  def decorator(fn):
    return register_loss_term(name, needs=needs,
                              validate=lambda **options: fn(_dummy_inputs(), **options))(fn)
  return decorator


def _get(inputs: Mapping[str, Any], keys: Sequence[str], term: str):
  missing = [k for k in keys if inputs.get(k) is None]
  if missing:
    present = sorted(k for k, v in inputs.items() if v is not None)
    raise ValueError(f"loss term {term!r} needs the inputs {list(keys)}; missing {missing}"
                     f" (the batch has {present}).")
  return [inputs[k] for k in keys]


def _sums(x):
  return x.sum if isinstance(x, sequences.SequenceLogprobs) else x


def _means(x, term):
  if not isinstance(x, sequences.SequenceLogprobs):
    raise TypeError(f"loss term {term!r} needs length-averaged log-probs: give SequenceLogprobs.")
  return x.mean


@_register("dpo", _PAIRS)
def _dpo_term(inputs, *, loss_type: str | Sequence[str] = "sigmoid",
              loss_weights: Sequence[float] | None = None, beta: float = 0.1,
              label_smoothing: float | None = None, options: Mapping[str, Any] | None = None,
              fused: bool = False):
  """Any TRL DPO loss type or weighted list of them (teacher-as-reference: ref = teacher)."""
  del fused  # Read by the train step (log-probs from hidden states, chunked).
  pc, pr, rc, rr = _get(inputs, _PAIRS[0], "dpo")
  shared = {"beta": beta}
  if label_smoothing is not None:
    shared["label_smoothing"] = label_smoothing
  loss = dpo.preference_loss(pc, pr, rc, rr, loss_type=loss_type,
                                   loss_weights=loss_weights, options=options, **shared)
  return jnp.mean(loss), dpo.preference_metrics(_sums(pc), _sums(pr), _sums(rc),
                                                      _sums(rr), beta=beta)


@_register("simpo", _FREE)
def _simpo_term(inputs, *, beta: float = 2.0, gamma_beta_ratio: float = 0.25,
                label_smoothing: float = 0.0, fused: bool = False):
  del fused
  pc, pr = (_means(x, "simpo") for x in _get(inputs, _FREE[0], "simpo"))
  loss = reference_free.simpo_loss(pc, pr, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                              label_smoothing=label_smoothing)
  return jnp.mean(loss), dpo.preference_metrics(pc, pr, beta=beta)


@_register("cpo", _FREE)
def _cpo_term(inputs, *, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 1.0,
              fused: bool = False):
  del fused
  pc, pr = _get(inputs, _FREE[0], "cpo")
  loss = reference_free.cpo_loss(_sums(pc), _sums(pr), beta=beta, label_smoothing=label_smoothing,
                            chosen_nll=-_means(pc, "cpo"), alpha=alpha)
  return jnp.mean(loss), dpo.preference_metrics(_sums(pc), _sums(pr), beta=beta)


@_register("orpo", _FREE)
def _orpo_term(inputs, *, lam: float = 0.1, fused: bool = False):
  del fused
  pc, pr = (_means(x, "orpo") for x in _get(inputs, _FREE[0], "orpo"))
  loss = reference_free.orpo_loss(pc, pr, lam=lam)
  metrics = dpo.preference_metrics(pc, pr, beta=lam)
  metrics["log_odds_ratio"] = jnp.mean(reference_free.orpo_log_odds_ratio(pc, pr))
  return jnp.mean(loss), metrics


@_register("kto", (("policy", "ref", "desirable", "policy_kl", "ref_kl"),))
def _kto_term(inputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0, fused: bool = False):
  del fused
  p, r, desirable, pk, rk = _get(inputs, ("policy", "ref", "desirable", "policy_kl", "ref_kl"),
                                 "kto")
  z = dpo.kto_kl_estimate(_sums(pk), _sums(rk))
  loss = dpo.kto_loss(_sums(p), _sums(r), desirable, kl=z, beta=beta,
                            desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight)
  return jnp.mean(loss), {"kl": z}


@_register("tpo", _LISTS)
def _tpo_term(inputs, *, beta: float = 0.1, weighting: str = "lambda", gain: str = "exp2",
              fused: bool = False):
  """TPO's preference-list ranking loss (:func:`jkd.losses.tpo_loss`), mean over lists; metrics
  of :func:`jkd.losses.ranking_metrics` (``tpo/rewards/ranking_accuracy``, ...)."""
  del fused
  p, r, v, m = _get(inputs, _LISTS[0], "tpo")
  loss = listwise.tpo_loss(p, r, v, m, beta=beta, weighting=weighting, gain=gain)
  return jnp.mean(loss), listwise.ranking_metrics(p, r, v, m, beta=beta)


@_register("redi", _FREE)
def _redi_term(inputs, *, c_pos: float = 1.0, c_neg: float = 0.8, fused: bool = False):
  del fused
  pc, pr = (_means(x, "redi") for x in _get(inputs, _FREE[0], "redi"))
  return jnp.mean(reference_free.redi_loss(pc, pr, c_pos=c_pos, c_neg=c_neg))


# Distillation-flavoured preference terms (DCKD, ADPA). The train step adds their per-token
# inputs only when one of them is in the objective (:mod:`jkd.train.preference_step`):
# ``chosen_student_logits``/``rejected_student_logits`` ``[B, T, V]``, ``chosen_labels``/
# ``rejected_labels`` ``[B, T]``, ``chosen_teacher_topk``/``rejected_teacher_topk``
# (:class:`jkd.losses.SparseTeacher` ``[B, T, k]``: the teacher's top-k, computed in the step from
# the teacher's forward on both sequences, or given by the batch) and, for ADPA,
# ``chosen_teacher_ref_logprobs``/``rejected_teacher_ref_logprobs`` ``[B, T, k]``: the teacher's
# reference (pre-alignment) log-probs at the same ids, given by the batch.

#: The per-token inputs of the DCKD and ADPA terms (the step adds them only for these terms).
SPARSE_PAIR_INPUTS = ("chosen_student_logits", "rejected_student_logits", "chosen_labels",
                      "rejected_labels", "chosen_teacher_topk", "rejected_teacher_topk",
                      "chosen_teacher_ref_logprobs", "rejected_teacher_ref_logprobs")
_DCKD = ("chosen_student_logits", "chosen_labels", "chosen_teacher_topk",
         "rejected_student_logits", "rejected_labels", "rejected_teacher_topk")
_ADPA = ("chosen_student_logits", "chosen_labels", "chosen_teacher_topk",
         "chosen_teacher_ref_logprobs", "rejected_student_logits", "rejected_labels",
         "rejected_teacher_topk", "rejected_teacher_ref_logprobs")
_ADPA_ON = ("both", "chosen", "rejected")


def _check_k(k) -> None:
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k (teacher ids kept per position) must be an int >= 1 (got {k!r}).")


@register_loss_term("dckd", needs=(_DCKD,),
                    validate=lambda *, k=50, kd_weight=0.1, tail=True: _check_k(k))
def _dckd_term(inputs, *, k: int = 50, kd_weight: float = 0.1, tail: bool = True):
  """DCKD (:func:`jkd.losses.dckd_loss`), mean over pairs; ``k``: the teacher's top-k (read by
  the step). Metrics: the chosen NLL and the two top-k forward KLs (token means)."""
  del k  # Read by the train step (the teacher's top-k).
  zc, yc, tc, zr, yr, tr = _get(inputs, _DCKD, "dckd")
  loss = aligned_teacher.dckd_loss(zc, yc, tc, zr, yr, tr, kd_weight=kd_weight, tail=tail)
  nll = aligned_teacher.dckd_loss(zc, yc, tc, zr, yr, tr, kd_weight=0.0, tail=tail)
  return jnp.mean(loss), {"nll": jnp.mean(nll)}


def _label_mask(labels):
  return jnp.asarray(labels) != IGNORE_INDEX


@register_loss_term("adpa", needs=(_ADPA,),
                    validate=lambda *, k=50, kd_weight=1.6, on="both": (
                        _check_k(k), _check_on(on)))
def _adpa_term(inputs, *, k: int = 50, kd_weight: float = 1.6, on: str = "both"):
  """ADPA: ``NLL(y_w) + kd_weight * masked_mean(adpa_advantage_loss)`` over the completion
  tokens of the ``on`` sequences (``both``, ``chosen`` or ``rejected``; ADPA's are the student's
  own responses). The advantage is ``teacher log-probs - teacher reference log-probs`` at the
  teacher's top-k ids (:func:`jkd.losses.adpa_advantage_loss`). Metrics: ``nll``,
  ``advantage`` (the weighted term before ``kd_weight``)."""
  del k
  zc, yc, tc, rc, zr, yr, tr, rr = _get(inputs, _ADPA, "adpa")
  sides = {"chosen": (zc, yc, tc, rc), "rejected": (zr, yr, tr, rr)}
  use = ("chosen", "rejected") if on == "both" else (on,)
  total = count = 0.0
  for side in use:
    z, y, t, r = sides[side]
    mask = _label_mask(y)
    values = aligned_teacher.adpa_advantage_loss(z, t.ids, t.logprobs, r, where=mask)
    total = total + jnp.sum(values)
    count = count + jnp.sum(mask)
  advantage = total / jnp.maximum(count, 1)
  nll = jnp.mean(-sequences.sequence_logprobs(zc, yc).mean)
  return nll + float(kd_weight) * advantage, {"nll": nll, "advantage": advantage}


def _check_on(on) -> None:
  if on not in _ADPA_ON:
    raise ValueError(f"on must be one of {list(_ADPA_ON)} (the completions the advantage term"
                     f" covers), got {on!r}.")
