"""Sparse-teacher form of every divergence: the teacher given as its top-k ids and log-probs.

This is what an offline teacher cache stores (top-k ids as int32/uint16, log-probs as
float16/bfloat16), so that training does not need the teacher in memory. The divergence is taken
over ``k`` bins (both distributions renormalised over the teacher's top-k ids) or, with
``tail=True``, over ``k + 1`` bins: the ``k`` ids plus one bin holding the remaining mass of each
distribution. With ``k = vocab`` both equal the full form exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import divergences

Array = jax.Array


def _topk_membership(ids: Array, vocab: int) -> Array:
  """Boolean ``[..., vocab]``: True at the ids listed in ``ids [..., k]``."""
  flat = ids.reshape(-1, ids.shape[-1])
  mark = jax.vmap(lambda row: jnp.zeros((vocab,), jnp.bool_).at[row].set(True, mode="drop"))
  return mark(flat).reshape(ids.shape[:-1] + (vocab,))


def _log_remaining_mass(lp_k: Array) -> Array:
  """``log(1 - sum(exp(lp_k)))`` over the last axis, keepdims, without float32 cancellation.

  For a peaked teacher the top log-prob is close to 0 and ``exp`` of it rounds to 1 in float32,
  losing the tail mass; ``1 - p_max (1 + r)`` is instead formed as ``-expm1(lp_max +
  log1p(r))``, with ``r`` the other bins' mass relative to the top one.
  """
  top = jnp.max(lp_k, axis=-1, keepdims=True)
  is_top = jnp.arange(lp_k.shape[-1]) == jnp.argmax(lp_k, axis=-1)[..., None]
  safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
  rest = jnp.sum(jnp.where(is_top, 0.0, jnp.exp(lp_k - safe_top)), axis=-1, keepdims=True)
  log_mass = jnp.minimum(top + jnp.log1p(rest), 0.0)
  return jnp.log(-jnp.expm1(log_mass))


def sparse_bins(student_logits: Array, teacher_ids: Array, teacher_logprobs: Array, *,
                tail: bool = True, teacher_tail_logprob: Array | None = None,
                temperature: float = 1.0) -> tuple[Array, Array]:
  """Student and teacher log-probabilities over the sparse bins (validated).

  Returns:
    ``(student_logprobs, teacher_logprobs)``, each ``[..., k]`` or ``[..., k + 1]`` with tail.
  """
  zs = _common.check_float_array(student_logits, "student_logits")
  lp_k = _common.check_float_array(teacher_logprobs, "teacher_logprobs")
  lp_k = lp_k.astype(_common.compute_dtype(lp_k.dtype))
  temperature = _common.check_temperature(temperature)
  vocab = zs.shape[-1]
  if jnp.ndim(teacher_ids) != zs.ndim or jnp.shape(teacher_ids)[:-1] != zs.shape[:-1]:
    raise ValueError(
        f"teacher_ids shape {jnp.shape(teacher_ids)} must be student_logits' positions"
        f" {zs.shape[:-1]} plus a top-k axis.")
  ids = _common.check_ids(teacher_ids, vocab, "teacher_ids")
  k = ids.shape[-1]
  if lp_k.shape != ids.shape:
    raise ValueError(f"teacher_logprobs shape {lp_k.shape} != teacher_ids shape {ids.shape}.")
  if k > vocab:
    raise ValueError(f"top-k size {k} exceeds the student vocabulary {vocab}.")
  log_q = _common.log_softmax_t(zs, temperature)
  lq_k = jnp.take_along_axis(log_q, ids.astype(jnp.int32), axis=-1, mode="fill",
                             fill_value=jnp.nan)
  if tail and k < vocab:
    outside = ~_topk_membership(ids.astype(jnp.int32), vocab)
    # The student's remaining mass; when it is empty (every token outside the ids banned), the
    # logsumexp runs on zeros instead, so that its gradient is 0 rather than NaN (double where).
    empty = ~jnp.any(outside & (log_q > -jnp.inf), axis=-1, keepdims=True)
    safe = jnp.where(empty, 0.0, jnp.where(outside, log_q, -jnp.inf))
    lq_tail = jnp.where(empty, -jnp.inf, jax.nn.logsumexp(safe, axis=-1, keepdims=True))
    if teacher_tail_logprob is None:
      lp_tail = _log_remaining_mass(lp_k)
    else:
      lp_tail = _common.check_float_array(teacher_tail_logprob, "teacher_tail_logprob")
      if lp_tail.shape != ids.shape[:-1]:
        raise ValueError(f"teacher_tail_logprob shape {lp_tail.shape} must be {ids.shape[:-1]}.")
      lp_tail = lp_tail.astype(_common.compute_dtype(lp_tail.dtype))[..., None]
    student = jnp.concatenate([lq_k, lq_tail], axis=-1)
    teacher = jnp.concatenate([lp_k, lp_tail], axis=-1)
  else:
    student = jax.nn.log_softmax(lq_k, axis=-1)
    teacher = lp_k
  # The teacher's log-probs are stored at temperature 1: temper and renormalise over the bins
  # (exact without a tail bin, and with k = vocab; the tail is tempered as one bin).
  teacher = jax.nn.log_softmax(teacher / temperature if temperature != 1.0 else teacher, axis=-1)
  return student, teacher


def _mask_inputs(where, zs, ids, lp_k, lp_tail):
  """Neutral inputs at masked positions (double-where: they give no NaN, nor NaN gradients).

  Shapes are left to :func:`sparse_bins` to validate: mismatched inputs pass through unchanged.
  """
  if where is None:
    return zs, ids, lp_k, lp_tail
  zs = _common.mask_rows(zs, where)
  if lp_k.shape[:-1] == where.shape:
    lp_k = _common.mask_rows(lp_k, where)
  if jnp.shape(ids)[:-1] == where.shape and jnp.ndim(ids) > 0:
    ids = jnp.asarray(ids)
    ids = jnp.where(where[..., None], ids, jnp.arange(ids.shape[-1], dtype=ids.dtype))
  if lp_tail is not None and jnp.shape(lp_tail) == where.shape:
    lp_tail = _common.mask_rows(jnp.asarray(lp_tail)[..., None], where)[..., 0]
  return zs, ids, lp_k, lp_tail


def sparse_divergence(student_logits: Array, teacher_ids: Array, teacher_logprobs: Array, *,
                      divergence: str = "forward_kl", tail: bool = True,
                      teacher_tail_logprob: Array | None = None, temperature: float = 1.0,
                      where: Array | None = None, **options: Any) -> Array:
  r"""Any token-level divergence against a sparse (top-k) teacher, per position.

  The student's probabilities are gathered at the teacher's ids; with ``tail=True`` each side
  gets one more bin, holding its remaining mass (the student's is computed exactly from its
  logits; the teacher's is ``1 - sum(exp(teacher_logprobs))`` unless ``teacher_tail_logprob``
  gives it). Without the tail both sides are renormalised over the ``k`` ids.

  Args:
    student_logits: ``[..., vocab]`` student logits.
    teacher_ids: ``[..., k]`` integer ids of the teacher's top-k tokens (distinct per position).
    teacher_logprobs: ``[..., k]`` teacher log-probabilities at those ids, at temperature 1
      (any float dtype; float16 is typical).
    divergence: one of ``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``skew_kl``,
      ``skew_reverse_kl``, ``total_variation``, ``adaptive_kl``, ``balanced_kl``, ``taid``.
    tail: add the remaining-mass bin (ignored when ``k == vocab``).
    teacher_tail_logprob: optional ``[...]`` log of the teacher's remaining mass, as stored by a
      cache (more accurate than recomputing it from float16 log-probs).
    temperature: ``T > 0``; the student is tempered exactly, the teacher's bins are tempered and
      renormalised (exact without a tail and for ``k = vocab``). Times ``T**2``.
    where: optional boolean ``[...]`` mask. The inputs at masked positions are ignored (a
      cache's padding may hold anything there) and give no NaN, in values or gradients.
    **options: the divergence's options (``beta``, ``alpha``, ``mu``, ``t``).

  Returns:
    ``[...]`` float32 divergences, 0 where ``where`` is False.

  References: FIRST (Shum et al., 2024), DCKD/ADPA (top-50 plus a tail bin).

  >>> import jax, jax.numpy as jnp
  >>> zs, zt = jnp.array([0.0, 1.0, 2.0]), jnp.array([2.0, 1.0, 0.0])
  >>> ids = jnp.array([0, 1, 2]); lp = jax.nn.log_softmax(zt)
  >>> bool(jnp.allclose(sparse_divergence(zs, ids, lp), divergences.forward_kl(zs, zt)))
  True
  """
  core, options = divergences.resolve_core(divergence, options)
  zs = _common.check_float_array(student_logits, "student_logits")
  lp_k = _common.check_float_array(teacher_logprobs, "teacher_logprobs")
  where = _common.check_where(where, zs.shape[:-1])
  zs, teacher_ids, lp_k, teacher_tail_logprob = _mask_inputs(
      where, zs, teacher_ids, lp_k, teacher_tail_logprob)
  student, teacher = sparse_bins(zs, teacher_ids, lp_k, tail=tail,
                                 teacher_tail_logprob=teacher_tail_logprob,
                                 temperature=temperature)
  values = core(student, teacher, **options) * (temperature ** 2)
  return _common.apply_where(values, where)
