"""Distilling an aligned teacher at the token level inside preference training: DCKD and ADPA
(Gao et al., ICLR 2025; docs/methods.md §10), from the teacher's sparse top-k
(:class:`SparseTeacher`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import sequences
from jkd.losses import sparse
from jkd.losses import tokens

Array = jax.Array


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
  nll = -sequences.sequence_logprobs(chosen_logits, chosen_labels).mean
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
