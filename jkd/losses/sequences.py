"""Per-sequence log-probabilities of completions, the inputs of every preference loss.

:func:`sequence_logprobs` sums (and averages) the label log-probs of each sequence from its
logits; :func:`fused_sequence_logprobs` does it from the final hidden states and the output head
in chunks, never materialising the ``[batch, seq, vocab]`` logits. Both return a
:class:`SequenceLogprobs` (``sum``, ``mean``, token ``count``): preference losses take the summed
log-probs unless they want them length-averaged (IPO, SimPO, ORPO, REDI, ``sigmoid_norm``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jkd.losses import _common
from jkd.losses import fused as fused_lib
from jkd.losses import tokens

Array = jax.Array


class SequenceLogprobs(NamedTuple):
  """Per-sequence log-probabilities of the completion tokens.

  Attributes:
    sum: ``[B]`` summed log-probs (``log p(y|x)``).
    mean: ``[B]`` length-averaged log-probs (``sum / count``; NaN for an empty completion
      under ``jit``, a ``ValueError`` when called eagerly).
    count: ``[B]`` number of completion tokens.
  """
  sum: Array
  mean: Array
  count: Array


def _check_nonempty(count: Array, name: str) -> None:
  if not isinstance(count, jax.core.Tracer):
    host = np.asarray(count)
    if host.size and (host <= 0).any():
      raise ValueError(
          f"{name}: sequence(s) {np.flatnonzero(host <= 0)[:5].tolist()} have no completion"
          " token (every label is ignore_index or masked). A length-averaged log-prob is"
          " undefined for them: drop empty completions from the data.")


def _from_token_logprobs(values: Array, mask: Array, name: str) -> SequenceLogprobs:
  count = jnp.sum(mask, axis=-1)
  _check_nonempty(count, name)
  total = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)
  mean = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
  return SequenceLogprobs(sum=total, mean=mean, count=count)


def sequence_logprobs(logits: Array, labels: Array, *, where: Array | None = None,
                      ignore_index: int = tokens.IGNORE_INDEX,
                      temperature: float = 1.0) -> SequenceLogprobs:
  r"""Summed and length-averaged log-probs of each sequence's completion tokens.

  .. math:: \log p(y|x) = \sum_{t \in C} \log \mathrm{softmax}(z_t)_{y_t},\qquad
            \overline{\log p} = \log p(y|x) / |C|

  with ``C`` the counted tokens: ``labels != ignore_index`` and ``where`` (prompt and padding
  are masked out by giving them ``ignore_index`` or False).

  Args:
    logits: ``[B, T, V]`` logits (already aligned with ``labels``: position ``t`` predicts
      ``labels[:, t]``).
    labels: ``[B, T]`` token ids or ``ignore_index``.
    where: optional boolean ``[B, T]``.
    ignore_index: label value of positions that do not count (-100).
    temperature: softmax temperature (1 for DPO).

  Returns:
    :class:`SequenceLogprobs` with ``[B]`` arrays.

  >>> import jax.numpy as jnp
  >>> lp = sequence_logprobs(jnp.zeros((1, 3, 4)), jnp.array([[-100, 1, 2]]))
  >>> round(float(lp.sum[0]), 4), round(float(lp.mean[0]), 4), int(lp.count[0])
  (-2.7726, -1.3863, 2)
  """
  values = tokens.token_logprobs(logits, labels, temperature=temperature,
                                 ignore_index=ignore_index, where=where)
  mask = tokens.label_mask(labels, ignore_index=ignore_index, where=where)
  return _from_token_logprobs(values, mask, "sequence_logprobs")


def _logprob_fn(ignore_index, logits, tok, shared):
  del shared
  return tokens.token_logprobs(logits, tok["labels"], ignore_index=ignore_index,
                               where=tok["where"])


def fused_sequence_logprobs(hidden: Array, head: Array, labels: Array, *,
                            where: Array | None = None,
                            ignore_index: int = tokens.IGNORE_INDEX,
                            chunk_size: int = fused_lib.DEFAULT_CHUNK_SIZE,
                            reference_hidden: Array | None = None,
                            reference_head: Array | None = None):
  """:func:`sequence_logprobs` from final hidden states and the output head, chunked over tokens.

  Never holds more than ``chunk_size x V`` logits (forward and backward: the backward pass
  recomputes each chunk's logits), and chunks over *tokens*, so memory does not grow with the
  length of a pair. Differentiable in ``hidden`` and ``head``.

  Args:
    hidden: ``[B, T, H]`` final hidden states of the policy.
    head: ``[H, V]`` its output head.
    labels, where, ignore_index: as :func:`sequence_logprobs`.
    chunk_size: tokens per chunk.
    reference_hidden, reference_head: optionally the reference model's (e.g. the teacher's)
      hidden states ``[B, T, Hr]`` and head ``[Hr, V]``: its log-probs are computed in the same
      call, as constants.

  Returns:
    :class:`SequenceLogprobs` of the policy, or ``(policy, reference)`` when a reference is
    given.

  >>> import jax.numpy as jnp
  >>> lp = fused_sequence_logprobs(jnp.ones((1, 3, 2)), jnp.zeros((2, 4)), jnp.array([[-100, 1, 2]]))
  >>> round(float(lp.mean[0]), 4)
  -1.3863
  """
  labels = jnp.asarray(labels)
  hidden = _common.check_float_array(hidden, "hidden")
  if hidden.ndim < 2 or labels.shape != hidden.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} must be hidden's positions"
                     f" {hidden.shape[:-1]}.")
  mask = tokens.label_mask(labels, ignore_index=ignore_index, where=where)
  head = _common.check_float_array(head, "head")
  _common.check_ids(labels, head.shape[-1], "labels", ignore_index=ignore_index)
  token_inputs = {"labels": labels.reshape(-1), "where": mask.reshape(-1)}
  fn = functools.partial(_logprob_fn, ignore_index)

  def run(h, w, name):
    if h.ndim != hidden.ndim or h.shape[:-1] != hidden.shape[:-1]:
      raise ValueError(f"{name} positions {h.shape[:-1]} != {hidden.shape[:-1]}.")
    values = fused_lib.chunked_token_values(fn, h.reshape(-1, h.shape[-1]), w, token_inputs,
                                            chunk_size=chunk_size)
    return _from_token_logprobs(values.reshape(labels.shape), mask, "fused_sequence_logprobs")

  policy = run(hidden, head, "hidden")
  if reference_hidden is None and reference_head is None:
    return policy
  if reference_hidden is None or reference_head is None:
    raise ValueError("pass both reference_hidden and reference_head, or neither.")
  ref_hidden = jax.lax.stop_gradient(_common.check_float_array(reference_hidden,
                                                               "reference_hidden"))
  ref_head = jax.lax.stop_gradient(_common.check_float_array(reference_head, "reference_head"))
  if ref_head.shape[-1] != head.shape[-1]:
    raise ValueError(f"reference vocab {ref_head.shape[-1]} != policy vocab {head.shape[-1]}.")
  reference = run(ref_hidden, ref_head, "reference_hidden")
  return policy, jax.tree.map(jax.lax.stop_gradient, reference)
