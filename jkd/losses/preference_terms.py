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
====================  ======================================================================

Each term returns the mean loss over pairs and the standard metrics (``<name>/rewards/...``).
Every term takes ``fused=False``: the train step then computes the log-probs from hidden states
and the output head, chunked over tokens (:func:`jkd.losses.fused_sequence_logprobs`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jkd.losses import alignment
from jkd.losses import preference
from jkd.losses.objective import register_loss_term

_PAIRS = (("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),)
_FREE = (("policy_chosen", "policy_rejected"),)


def _dummy_inputs() -> dict[str, Any]:
  lp = preference.SequenceLogprobs(sum=-jnp.ones((2,)), mean=-jnp.ones((2,)) / 2,
                                   count=jnp.full((2,), 2))
  return {"policy_chosen": lp, "policy_rejected": lp, "ref_chosen": lp, "ref_rejected": lp,
          "policy": lp, "ref": lp, "policy_kl": lp, "ref_kl": lp,
          "desirable": jnp.array([True, False])}


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
  return x.sum if isinstance(x, preference.SequenceLogprobs) else x


def _means(x, term):
  if not isinstance(x, preference.SequenceLogprobs):
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
  loss = alignment.preference_loss(pc, pr, rc, rr, loss_type=loss_type,
                                   loss_weights=loss_weights, options=options, **shared)
  return jnp.mean(loss), alignment.preference_metrics(_sums(pc), _sums(pr), _sums(rc),
                                                      _sums(rr), beta=beta)


@_register("simpo", _FREE)
def _simpo_term(inputs, *, beta: float = 2.0, gamma_beta_ratio: float = 0.25,
                label_smoothing: float = 0.0, fused: bool = False):
  del fused
  pc, pr = (_means(x, "simpo") for x in _get(inputs, _FREE[0], "simpo"))
  loss = alignment.simpo_loss(pc, pr, beta=beta, gamma_beta_ratio=gamma_beta_ratio,
                              label_smoothing=label_smoothing)
  return jnp.mean(loss), alignment.preference_metrics(pc, pr, beta=beta)


@_register("cpo", _FREE)
def _cpo_term(inputs, *, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 1.0,
              fused: bool = False):
  del fused
  pc, pr = _get(inputs, _FREE[0], "cpo")
  loss = alignment.cpo_loss(_sums(pc), _sums(pr), beta=beta, label_smoothing=label_smoothing,
                            chosen_nll=-_means(pc, "cpo"), alpha=alpha)
  return jnp.mean(loss), alignment.preference_metrics(_sums(pc), _sums(pr), beta=beta)


@_register("orpo", _FREE)
def _orpo_term(inputs, *, lam: float = 0.1, fused: bool = False):
  del fused
  pc, pr = (_means(x, "orpo") for x in _get(inputs, _FREE[0], "orpo"))
  loss = alignment.orpo_loss(pc, pr, lam=lam)
  metrics = alignment.preference_metrics(pc, pr, beta=lam)
  metrics["log_odds_ratio"] = jnp.mean(alignment.orpo_log_odds_ratio(pc, pr))
  return jnp.mean(loss), metrics


@_register("kto", (("policy", "ref", "desirable", "policy_kl", "ref_kl"),))
def _kto_term(inputs, *, beta: float = 0.1, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0, fused: bool = False):
  del fused
  p, r, desirable, pk, rk = _get(inputs, ("policy", "ref", "desirable", "policy_kl", "ref_kl"),
                                 "kto")
  z = alignment.kto_kl_estimate(_sums(pk), _sums(rk))
  loss = alignment.kto_loss(_sums(p), _sums(r), desirable, kl=z, beta=beta,
                            desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight)
  return jnp.mean(loss), {"kl": z}


@_register("redi", _FREE)
def _redi_term(inputs, *, c_pos: float = 1.0, c_neg: float = 0.8, fused: bool = False):
  del fused
  pc, pr = (_means(x, "redi") for x in _get(inputs, _FREE[0], "redi"))
  return jnp.mean(alignment.redi_loss(pc, pr, c_pos=c_pos, c_neg=c_neg))
