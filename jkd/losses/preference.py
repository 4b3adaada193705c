"""Preference optimisation: sequence log-probs and the DPO family of losses.

Inputs are per-sequence log-probabilities of the completions, shape ``[batch]``: the policy's
and the reference's, for the chosen and the rejected completion of each pair. With
``h = (pc - rc) - (pr - rr)`` (the policy's log-ratio margin over the reference's), every loss
returns per-example values ``[batch]``; reduce them with ``jnp.mean``. Log-probs are *summed*
over completion tokens unless a loss says it wants them length-averaged (IPO, SimPO, ORPO, REDI,
``sigmoid_norm``): pass :attr:`SequenceLogprobs.mean` there.

Implicit rewards ``beta * (pc - rc)`` and ``beta * (pr - rr)``, their margin and accuracy come
from :func:`preference_metrics`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Sequence

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


# ----------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------

def _as_logps(*arrays: Any, names: Sequence[str]) -> list[Array]:
  out = []
  shape = None
  for a, name in zip(arrays, names):
    a = _common.check_float_array(a, name)
    a = a.astype(_common.compute_dtype(a.dtype))
    if a.ndim != 1:
      raise ValueError(f"{name} must be per-sequence log-probs of shape [batch], got {a.shape}.")
    if shape is None:
      shape = a.shape
    elif a.shape != shape:
      raise ValueError(
          f"{name} has shape {a.shape} but {names[0]} has {shape}: the chosen/rejected and"
          " policy/reference log-probs must all be [batch] for the same pairs.")
    out.append(a)
  return out


_FOUR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _beta(beta: Any) -> float:
  return _common.check_positive(beta, "beta")


def _smoothing(value: Any, name: str = "label_smoothing", high: float = 1.0,
               inclusive: bool = False) -> float:
  """``value`` in ``[0, high)``, or ``[0, high]`` when ``inclusive``."""
  v = _common.check_unit_interval(value, name)
  if v > high or (v == high and not inclusive):
    raise ValueError(f"{name} must be {'<=' if inclusive else '<'} {high} (got {value}).")
  return v


def _log1mexp(x: Array) -> Array:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative ``x``."""
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _margins(pc, pr, rc, rr):
  chosen = pc - rc
  rejected = pr - rr
  return chosen, rejected, chosen - rejected


# ----------------------------------------------------------------------------------------------
# Losses of the four log-prob arrays (TRL's DPO loss types).
# ----------------------------------------------------------------------------------------------

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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta, e = _beta(beta), _smoothing(label_smoothing, high=0.5, inclusive=True)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta, e = _beta(beta), _smoothing(label_smoothing, high=0.5)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  return jax.nn.relu(1.0 - _beta(beta) * _margins(pc, pr, rc, rr)[2])


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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
  chosen, rejected, _ = _margins(pc, pr, rc, rr)
  return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def _smoothed_sigmoid(x: Array, e: float) -> Array:
  return -(1 - e) * jax.nn.log_sigmoid(x) - e * jax.nn.log_sigmoid(-x)


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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta, e = _beta(beta), _smoothing(label_smoothing, high=0.5, inclusive=True)
  d = jnp.sort(pc - pr) - jnp.sort(rc - rr)
  return _smoothed_sigmoid(beta * d, e)


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, *, beta: float = 0.1,
                      label_smoothing: float = 0.0) -> Array:
  r"""AOT, unpaired (TRL ``aot_unpaired``): ``d = sort(pc - rc) - sort(pr - rr)`` over the batch.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros(2)
  >>> round(float(aot_unpaired_loss(z, z, z, z)[1]), 4)
  0.6931
  """
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta, e = _beta(beta), _smoothing(label_smoothing, high=0.5, inclusive=True)
  d = jnp.sort(pc - rc) - jnp.sort(pr - rr)
  return _smoothed_sigmoid(beta * d, e)


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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta = _beta(beta)
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  beta, tau = _beta(beta), _common.check_positive(tau, "tau")
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
  pc, pr, rc, rr = _as_logps(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                             ref_rejected_logps, names=_FOUR)
  return -jax.nn.log_sigmoid(_beta(beta) * _margins(pc, pr, rc, rr)[2])


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
  (pc,) = _as_logps(policy_chosen_logps, names=("policy_chosen_logps",))
  return -pc
