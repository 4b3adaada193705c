"""Token log-probabilities, cross-entropy against labels, and explicit masked reductions."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from jkd.losses import _common

Array = jax.Array

IGNORE_INDEX = -100


def _as_compute(values) -> Array:
  values = jnp.asarray(values)
  return values.astype(_common.compute_dtype(values.dtype))


def label_mask(labels: Array, *, ignore_index: int = IGNORE_INDEX,
               where: Array | None = None) -> Array:
  """Boolean mask of the positions that count: ``labels != ignore_index`` and ``where``."""
  mask = jnp.asarray(labels) != ignore_index
  if where is not None:
    mask = mask & _common.check_where(where, mask.shape)
  return mask


def token_logprobs(logits: Array, labels: Array, *, temperature: float = 1.0,
                   ignore_index: int = IGNORE_INDEX, where: Array | None = None) -> Array:
  r"""Log-probability of each label under ``softmax(logits / T)``.

  .. math:: \log \mathrm{softmax}(z/T)_{y}

  Args:
    logits: ``[..., vocab]`` logits (any float dtype; float32 compute).
    labels: ``[...]`` integer ids in ``[0, vocab)``, or ``ignore_index`` for positions that do
      not count.
    temperature: softmax temperature ``T > 0``.
    ignore_index: label value of ignored positions (-100, as in Hugging Face).
    where: optional boolean ``[...]``; positions where it is False give 0.

  Returns:
    ``[...]`` float32 log-probabilities, 0 at ignored or masked positions. Out-of-range ids are a
    ``ValueError`` when the labels are concrete; under ``jit`` such a position gives NaN.

  >>> import jax.numpy as jnp
  >>> float(token_logprobs(jnp.zeros((4,)), jnp.array(2)))  # log(1/4)
  -1.3862943649291992
  """
  logits = _common.check_float_array(logits, "logits")
  vocab = logits.shape[-1]
  temperature = _common.check_temperature(temperature)
  labels = _common.check_ids(labels, vocab, "labels", ignore_index=ignore_index)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must equal logits shape without the vocab"
                     f" axis, {logits.shape[:-1]}.")
  mask = label_mask(labels, ignore_index=ignore_index, where=where)
  log_q = _common.log_softmax_t(_common.mask_rows(logits, mask), temperature)
  safe = jnp.where(mask, labels, 0)
  picked = jnp.take_along_axis(log_q, safe[..., None], axis=-1, mode="fill",
                               fill_value=jnp.nan)[..., 0]
  return jnp.where(mask, picked, 0.0)


def cross_entropy(logits: Array, labels: Array, *, ignore_index: int = IGNORE_INDEX,
                  where: Array | None = None, label_smoothing: float = 0.0) -> Array:
  r"""Per-token cross-entropy ``-log softmax(z)_y`` (optionally label-smoothed).

  With smoothing ``e``: ``(1 - e) * (-log q_y) + e * mean_v(-log q_v)``.

  Args:
    logits: ``[..., vocab]`` logits.
    labels: ``[...]`` integer ids, or ``ignore_index``.
    ignore_index: label value that does not count.
    where: optional boolean ``[...]`` mask.
    label_smoothing: ``e`` in [0, 1).

  Returns:
    ``[...]`` float32 losses, 0 where ignored or masked. Reduce with :func:`masked_mean`.

  >>> import jax.numpy as jnp
  >>> float(cross_entropy(jnp.zeros((2,)), jnp.array(1)))  # log 2
  0.6931471824645996
  """
  e = _common.check_unit_interval(label_smoothing, "label_smoothing", open_high=True)
  nll = -token_logprobs(logits, labels, ignore_index=ignore_index, where=where)
  if e == 0.0:
    return nll
  mask = label_mask(labels, ignore_index=ignore_index, where=where)
  logits = _common.mask_rows(jnp.asarray(logits), mask)
  uniform = -jnp.mean(_common.log_softmax_t(logits, 1.0), axis=-1)
  return jnp.where(mask, (1.0 - e) * nll + e * uniform, 0.0)


def masked_mean(values: Array, where: Array | None = None) -> Array:
  """Mean of ``values`` over the positions where ``where`` is True (0 if there are none).

  This is the token mean of a KD or CE loss: padding and prompt tokens do not dilute it.

  >>> import jax.numpy as jnp
  >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False])))
  2.0
  """
  values = _as_compute(values)
  if where is None:
    return jnp.mean(values)
  where = _common.check_where(where, values.shape)
  count = jnp.sum(where)
  return jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(count, 1)


def sequence_sum(values: Array, where: Array | None = None) -> Array:
  """Per-sequence sum over the last (time) axis: ``[..., T] -> [...]``.

  >>> import jax.numpy as jnp
  >>> sequence_sum(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[True, True, False]])).tolist()
  [3.0]
  """
  values = _as_compute(values)
  if where is not None:
    values = jnp.where(_common.check_where(where, values.shape), values, 0.0)
  return jnp.sum(values, axis=-1)


def sequence_mean(values: Array, where: Array | None = None) -> Array:
  """Per-sequence mean over the counted positions of the last axis (0 for an empty sequence).

  >>> import jax.numpy as jnp
  >>> sequence_mean(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[True, True, False]])).tolist()
  [1.5]
  """
  values = _as_compute(values)
  if where is None:
    return jnp.mean(values, axis=-1)
  where = _common.check_where(where, values.shape)
  count = jnp.sum(where, axis=-1)
  return sequence_sum(values, where) / jnp.maximum(count, 1)


