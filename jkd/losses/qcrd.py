"""QCRD: quality-guided contrastive rationale distillation (docs/methods.md §17).

The student learns from the teacher's rationales (positives) and is pushed away from its own
low-quality samples (negatives), each side weighted by a quality score in ``[0, 1]``:
likelihood on the positives, unlikelihood on the negatives. Inputs are per-sequence
**length-averaged** log-probs (:class:`jkd.losses.SequenceLogprobs` ``.mean``), so the
"probability" of a rationale is its geometric-mean token probability ``exp(mean log p)``, which
does not vanish with length the way a whole-sequence probability does.

The objective term ``qcrd`` (registered here in :data:`jkd.losses.LOSS_TERMS`) reads paired
batches: ``policy_chosen`` (the positive) and ``policy_rejected`` (the negative), and, for the
quality weights, the teacher's log-probs of both (``ref_chosen``/``ref_rejected``, which
:mod:`jkd.train.preference_step` computes from the frozen teacher). Batches come from
``data.source="qcrd"`` (:mod:`jkd.train.sources.qcrd`).

Reference: Wang et al., *QCRD: Quality-guided Contrastive Rationale Distillation for Large
Language Models*, arXiv:2405.13014, 2024 (EMNLP 2025).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import _pairs
from jkd.losses import sequences
from jkd.losses.objective import register_loss_term

Array = jax.Array

#: Clip of a length-averaged log-prob before ``log(1 - exp(.))``: a negative the student gives
#: probability 1 would have an infinite unlikelihood (the same clip as ORPO's odds).
MAX_LOGP = -1e-7
#: ``weighting`` choices of the ``qcrd`` term.
WEIGHTINGS = ("teacher", "none")


def _check_weights(w: Any, shape: tuple[int, ...], name: str) -> Array:
  w = _common.check_float_array(w, name)
  w = w.astype(_common.compute_dtype(w.dtype))
  if w.shape != shape:
    raise ValueError(f"{name} has shape {w.shape} but must have shape {shape} (one weight per"
                     " rationale).")
  if not isinstance(w, jax.core.Tracer):
    if not bool(jnp.all((w >= 0) & (w <= 1))):
      raise ValueError(f"{name} must hold quality scores in [0, 1] (got min {float(w.min())},"
                       f" max {float(w.max())}); squash raw scores first (e.g. a sigmoid).")
  return w


def qcrd_loss(positive_logps: Array, negative_logps: Array, *,
              positive_weights: Array | None = None, negative_weights: Array | None = None,
              negative_mask: Array | None = None, negative_weight: float = 1.0) -> Array:
  r"""Quality-weighted contrastive rationale loss, per example.

  With :math:`\bar\ell^+_i` the student's length-averaged log-prob of example ``i``'s positive
  rationale, :math:`\bar\ell^-_{ik}` those of its ``K`` negatives, quality weights
  :math:`w^+_i, w^-_{ik} \in [0, 1]` and the valid negatives :math:`M_i`:

  .. math:: \ell_i = -w^+_i\,\bar\ell^+_i - \frac{\lambda}{|M_i|} \sum_{k \in M_i} w^-_{ik}
            \log\bigl(1 - e^{\bar\ell^-_{ik}}\bigr)

  (``log(1 - e^x)`` computed stably, ``x`` clipped at :data:`MAX_LOGP`; an example with no
  valid negative keeps the positive part alone). The loss falls as the positive's likelihood
  rises and as the negatives' geometric-mean token probability falls; it is bounded below by 0.

  Args:
    positive_logps: ``[B]`` length-averaged log-probs of the positive (teacher) rationales.
    negative_logps: ``[B]`` (one negative each) or ``[B, K]`` length-averaged log-probs of the
      negative (the student's own) rationales.
    positive_weights: ``[B]`` quality scores of the positives (default 1).
    negative_weights: quality weights of the negatives, shaped like ``negative_logps``
      (default 1). QCRD weighs a negative by how bad it is: ``1 - quality``.
    negative_mask: bool, shaped like ``negative_logps``: the negatives that count (default all).
    negative_weight: :math:`\lambda` (1.0).

  Returns:
    ``[B]`` float32 (float64 for float64 inputs) losses.

  Raises:
    ValueError: shapes that disagree, weights outside ``[0, 1]``, or a negative ``lambda``.

  References: Wang et al., *QCRD: Quality-guided Contrastive Rationale Distillation for Large
  Language Models*, arXiv:2405.13014, 2024.

  >>> import jax.numpy as jnp
  >>> # -(-1) - log(1 - e^-2) = 1 + 0.1454
  >>> round(float(qcrd_loss(jnp.array([-1.0]), jnp.array([-2.0]))[0]), 4)
  1.1454
  """
  (pos,) = _pairs.as_logps(positive_logps, names=("positive_logps",))
  neg = _common.check_float_array(negative_logps, "negative_logps")
  neg = neg.astype(_common.compute_dtype(neg.dtype))
  if neg.ndim == 1:
    neg = neg[:, None]
    negative_weights = None if negative_weights is None else jnp.asarray(negative_weights)[:, None]
    negative_mask = None if negative_mask is None else jnp.asarray(negative_mask)[:, None]
  if neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
    raise ValueError(f"negative_logps must be [B] or [B, K] with B = {pos.shape[0]} (the"
                     f" positives'), got shape {neg.shape}.")
  if not isinstance(negative_weight, numbers.Real) or isinstance(negative_weight, bool) or (
      not math.isfinite(negative_weight) or negative_weight < 0):
    raise ValueError(f"negative_weight must be a finite number >= 0 (got {negative_weight!r}).")
  wp = (jnp.ones_like(pos) if positive_weights is None
        else _check_weights(positive_weights, pos.shape, "positive_weights"))
  wn = (jnp.ones_like(neg) if negative_weights is None
        else _check_weights(negative_weights, neg.shape, "negative_weights"))
  mask = _common.check_where(negative_mask, neg.shape, "negative_mask")
  valid = jnp.ones(neg.shape, bool) if mask is None else mask
  # Masked negatives never reach log1mexp (no NaN in the gradient), then count zero.
  safe = jnp.where(valid, jnp.minimum(neg, MAX_LOGP), -1.0)
  unlikelihood = jnp.where(valid, -wn * _pairs.log1mexp(safe), 0.0)
  count = valid.sum(-1)
  negative = unlikelihood.sum(-1) / jnp.maximum(count, 1)
  return -wp * pos + float(negative_weight) * negative


def quality_from_logps(mean_logps: Array) -> Array:
  """A quality score in ``(0, 1]`` from length-averaged log-probs: ``exp(mean log p)``, the
  geometric-mean token probability (gradient stopped).

  >>> import jax.numpy as jnp
  >>> round(float(quality_from_logps(jnp.array([0.0, -1.0]))[1]), 4)
  0.3679
  """
  x = _common.check_float_array(mean_logps, "mean_logps")
  return jax.lax.stop_gradient(jnp.exp(jnp.minimum(x.astype(_common.compute_dtype(x.dtype)), 0.0)))


# ---------------------------------------------------------------------------------------------
# The objective term.

_WITH_TEACHER = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_FREE = ("policy_chosen", "policy_rejected")


def _validate(*, weighting: str = "teacher", negative_weight: float = 1.0,
              fused: bool = False) -> None:
  del fused
  if weighting not in WEIGHTINGS:
    near = _common.nearest_names(str(weighting), WEIGHTINGS)
    raise ValueError(f"qcrd: weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}"
                     + (f" (did you mean {near}?)." if near else "."))
  if isinstance(negative_weight, bool) or not isinstance(negative_weight, numbers.Real) or (
      not math.isfinite(negative_weight) or negative_weight < 0):
    raise ValueError(f"qcrd: negative_weight must be a finite number >= 0 (got"
                     f" {negative_weight!r}).")


def _means(x: Any, name: str) -> Array:
  if not isinstance(x, sequences.SequenceLogprobs):
    raise TypeError(f"loss term 'qcrd' needs length-averaged log-probs: give {name} as"
                    " SequenceLogprobs.")
  return x.mean


@register_loss_term("qcrd", needs=(_WITH_TEACHER, _FREE), validate=_validate)
def _qcrd_term(inputs: Mapping[str, Any], *, weighting: str = "teacher",
               negative_weight: float = 1.0, fused: bool = False):
  r"""QCRD on paired batches: chosen = the teacher's rationale, rejected = the student's sample.

  ``weighting="teacher"``: the teacher judges quality, :math:`q(y) = \exp(\bar\ell_T(y))`
  (its geometric-mean token probability, :func:`quality_from_logps`), with
  :math:`w^+ = q(y^+)` and :math:`w^- = 1 - q(y^-)`; ``"none"``: all weights 1. Metrics:
  ``positive_nll``, ``negative_unlikelihood`` (the unweighted means), ``positive_weight``,
  ``negative_weight`` (mean weights) and ``margin`` (mean :math:`\bar\ell^+ - \bar\ell^-`).
  """
  del fused  # Read by the train step (log-probs from hidden states, chunked).
  missing = [k for k in _FREE if inputs.get(k) is None]
  if weighting == "teacher":
    missing += [k for k in ("ref_chosen", "ref_rejected") if inputs.get(k) is None]
  if missing:
    present = sorted(k for k, v in inputs.items() if v is not None)
    raise ValueError(f"loss term 'qcrd' (weighting={weighting!r}) needs {missing}; the batch"
                     f" has {present}. The teacher's log-probs come from the frozen teacher in"
                     " the step (teacher.online=True); or use weighting='none'.")
  pos = _means(inputs["policy_chosen"], "policy_chosen")
  neg = _means(inputs["policy_rejected"], "policy_rejected")
  if weighting == "teacher":
    wp = quality_from_logps(_means(inputs["ref_chosen"], "ref_chosen"))
    wn = 1.0 - quality_from_logps(_means(inputs["ref_rejected"], "ref_rejected"))
  else:
    wp, wn = jnp.ones_like(pos), jnp.ones_like(neg)
  loss = qcrd_loss(pos, neg, positive_weights=wp, negative_weights=wn,
                   negative_weight=negative_weight)
  unlikelihood = -_pairs.log1mexp(jnp.minimum(neg, MAX_LOGP))
  metrics = {"positive_nll": jnp.mean(-pos), "negative_unlikelihood": jnp.mean(unlikelihood),
             "positive_weight": jnp.mean(wp), "negative_weight": jnp.mean(wn),
             "margin": jnp.mean(pos - neg)}
  return jnp.mean(loss), metrics
