"""Listwise preference over the ranked responses of one prompt: TPO's preference-list ranking.

A prompt comes with ``K`` responses and a score for each (higher is better; graded, ties
allowed). Every response gets DPO's implicit reward ``r_i = beta (log pi(y_i|x) - log
pi_ref(y_i|x))``, and every pair of responses whose scores differ contributes a logistic loss
that the better one's reward exceed the worse one's, weighted as LambdaRank weighs a pair
(:func:`tpo_loss`). Lists may hold fewer than ``K`` responses: ``mask`` marks the real ones.

Inputs are ``[B, K]`` arrays (a batch of ``B`` lists of ``K`` slots); outputs are per list
``[B]`` (reduce with ``jnp.mean``). Formulas: docs/methods.md §8.16.

Reference: W. Liao, X. Chu, Y. Wang, *TPO: Aligning Large Language Models with Multi-branch &
Multi-step Preference Trees*, ICLR 2025, arXiv:2410.12854 (the preference-list ranking loss;
its lambda weights are those of LiPO-lambda: T. Liu et al., *LiPO: Listwise Preference
Optimization through Learning-to-Rank*, arXiv:2402.01878, 2024).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import _pairs
from jkd.losses import sequences

Array = jax.Array

#: ``weighting`` of :func:`tpo_loss`: the pair weights.
WEIGHTINGS = ("lambda", "uniform")
#: ``gain`` of :func:`tpo_loss` (with ``weighting="lambda"``): ``G(v)``.
GAINS = ("exp2", "linear")


def _sums(x: Any) -> Any:
  return x.sum if isinstance(x, sequences.SequenceLogprobs) else x


def _check_lists(policy_logps, ref_logps, scores, mask) -> tuple[Array, Array, Array, Array]:
  p = _common.check_float_array(_sums(policy_logps), "policy_logps")
  r = _common.check_float_array(_sums(ref_logps), "ref_logps")
  v = _common.check_float_array(scores, "scores")
  if p.ndim != 2 or p.shape[1] < 2:
    raise ValueError(f"policy_logps must be [batch, K] summed log-probs of K >= 2 responses per"
                     f" prompt, got shape {p.shape}.")
  for name, a in (("ref_logps", r), ("scores", v)):
    if a.shape != p.shape:
      raise ValueError(f"{name} has shape {a.shape} but policy_logps has {p.shape}: give one"
                       " value per response slot, [batch, K].")
  if mask is None:
    m = jnp.ones(p.shape, bool)
  else:
    m = jnp.asarray(mask)
    if m.shape != p.shape or m.dtype != jnp.bool_:
      raise ValueError(f"mask must be a bool [batch, K] array like policy_logps {p.shape}"
                       f" (True where a response is present), got {m.dtype}{list(m.shape)}.")
  dtype = _common.compute_dtype(jnp.result_type(p, r, v))
  return p.astype(dtype), r.astype(dtype), v.astype(dtype), m


def _pairs_mask(scores: Array, mask: Array) -> Array:
  """``[B, K, K]``: True where responses ``i`` and ``j`` are both present and ``v_i > v_j``."""
  both = mask[:, :, None] & mask[:, None, :]
  return both & (scores[:, :, None] > scores[:, None, :])


def reward_ranks(rewards: Array, mask: Array) -> Array:
  """``tau``: the 1-based rank of each present response when sorted by ``rewards``, best first.

  Ties go to the lower index; absent slots (``mask`` False) rank after every present one.

  Args:
    rewards: ``[B, K]`` float.
    mask: ``[B, K]`` bool.

  Returns:
    ``[B, K]`` int32 ranks in ``1..K``.

  >>> import jax.numpy as jnp
  >>> reward_ranks(jnp.array([[0.5, 2.0, 0.5, 9.0]]), jnp.array([[True, True, True, False]]))
  Array([[2, 1, 3, 4]], dtype=int32)
  """
  idx = jnp.arange(rewards.shape[-1])
  key = jnp.where(mask, rewards, -jnp.inf)  # Absent slots last (present rewards are finite).
  k_i, k_j = key[:, :, None], key[:, None, :]
  ahead = (k_j > k_i) | ((k_j == k_i) & (idx[None, :] < idx[:, None]))  # Slot j before slot i.
  return (1 + jnp.sum(ahead, axis=-1)).astype(jnp.int32)


def lambda_weights(scores: Array, rewards: Array, mask: Array, *, gain: str = "exp2") -> Array:
  r"""LambdaRank's pair weights ``|G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|``, ``[B, K, K]``.

  .. math:: G(v) = 2^v - 1\ (\texttt{exp2})\ \text{or}\ v\ (\texttt{linear}),\qquad
            D(\tau) = \log_2(1 + \tau)

  with ``tau`` the ranks of :func:`reward_ranks` (the current implicit rewards; no gradient).
  The weight of a pair is the change of the list's DCG when the two swap places.

  >>> import jax.numpy as jnp
  >>> w = lambda_weights(jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 0.0]]), jnp.ones((1, 2), bool))
  >>> round(float(w[0, 0, 1]), 4)  # |2 - 1| * (1 - 1 / log2(3))
  0.3691
  """
  if gain not in GAINS:
    raise ValueError(f"gain must be one of {list(GAINS)}, got {gain!r}.")
  g = jnp.exp2(scores) - 1.0 if gain == "exp2" else scores
  tau = reward_ranks(jax.lax.stop_gradient(rewards), mask).astype(scores.dtype)
  inv_d = 1.0 / jnp.log2(1.0 + tau)
  w = jnp.abs(g[:, :, None] - g[:, None, :]) * jnp.abs(inv_d[:, :, None] - inv_d[:, None, :])
  return jax.lax.stop_gradient(w)


def tpo_loss(policy_logps: Any, ref_logps: Any, scores: Array, mask: Array | None = None, *,
             beta: float = 0.1, weighting: str = "lambda", gain: str = "exp2") -> Array:
  r"""TPO's preference-list ranking loss over ``K`` scored responses per prompt.

  With implicit rewards :math:`r_i = \beta(\log\pi(y_i|x) - \log\pi_{ref}(y_i|x))` and scores
  :math:`v_i`, summed over the ordered pairs of present responses with :math:`v_i > v_j`:

  .. math:: \ell = \sum_{v_i > v_j} \lambda_{ij}\,\big[-\log\sigma(r_i - r_j)\big]

  ``weighting="lambda"`` (the paper's): :math:`\lambda_{ij} = |G_i - G_j|\,|1/D(\tau_i) -
  1/D(\tau_j)|` (:func:`lambda_weights`; ``tau`` the ranks by the current rewards). With
  ``weighting="uniform"`` every pair weighs ``1 / (number of pairs in the list)`` (RankNet's
  mean; ``K = 2`` is then exactly DPO). A list without a pair of different scores gives 0.

  Args:
    policy_logps: ``[B, K]`` summed log-probs of the responses under the policy (or
      :class:`~jkd.losses.SequenceLogprobs` of ``[B, K]`` arrays: the sums are used).
    ref_logps: ``[B, K]`` the same under the reference model.
    scores: ``[B, K]`` float preference scores (higher is better).
    mask: ``[B, K]`` bool, True where a response is present (default: all).
    beta: inverse temperature ``> 0`` of the implicit reward (0.1).
    weighting: ``"lambda"`` or ``"uniform"``.
    gain: ``G`` of the lambda weights: ``"exp2"`` (``2^v - 1``) or ``"linear"`` (``v``).

  Returns:
    ``[B]`` per-list losses.

  Reference: Liao et al., *TPO*, ICLR 2025, arXiv:2410.12854.

  >>> import jax.numpy as jnp
  >>> z = jnp.zeros((1, 2))
  >>> round(float(tpo_loss(z, z, jnp.array([[1.0, 0.0]]), weighting="uniform")[0]), 4)  # log 2
  0.6931
  """
  p, r, v, m = _check_lists(policy_logps, ref_logps, scores, mask)
  beta = _pairs.check_beta(beta)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}.")
  if gain not in GAINS:
    raise ValueError(f"gain must be one of {list(GAINS)}, got {gain!r}.")
  rewards = beta * (p - r)
  rewards = jnp.where(m, rewards, 0.0)  # Absent slots may hold anything (NaN): never read.
  pairs = _pairs_mask(v, m)
  margin = rewards[:, :, None] - rewards[:, None, :]
  pair_loss = jax.nn.softplus(-margin)  # -log sigmoid(r_i - r_j)
  if weighting == "lambda":
    w = lambda_weights(jnp.where(m, v, 0.0), rewards, m, gain=gain)
  else:
    n = jnp.sum(pairs, axis=(1, 2), keepdims=True)
    w = jnp.broadcast_to(1.0 / jnp.maximum(n, 1).astype(rewards.dtype), pairs.shape)
  return jnp.sum(jnp.where(pairs, w * pair_loss, 0.0), axis=(1, 2))


def _take(x: Array, index: Array) -> Array:
  return jnp.take_along_axis(x, index[:, None], axis=1)[:, 0]


def best_and_worst(scores: Array, mask: Array) -> tuple[Array, Array]:
  """``[B]`` int32 slots of the highest- and the lowest-scored present response (ties: the first).

  >>> import jax.numpy as jnp
  >>> mask = jnp.array([[True, True, True, False]])
  >>> b, w = best_and_worst(jnp.array([[1.0, 3.0, 0.0, 9.0]]), mask)
  >>> int(b[0]), int(w[0])
  (1, 2)
  """
  scores = jnp.asarray(scores)
  best = jnp.argmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(jnp.int32)
  worst = jnp.argmin(jnp.where(mask, scores, jnp.inf), axis=-1).astype(jnp.int32)
  return best, worst


def ranking_metrics(policy_logps: Any, ref_logps: Any, scores: Array, mask: Array | None = None,
                    *, beta: float = 0.1) -> dict[str, Array]:
  """Metrics of a batch of ranked lists (batch means, no gradient).

  ``rewards/ranking_accuracy``: the fraction of the batch's pairs of present responses with
  different scores whose implicit rewards are in the scores' order (strictly); ``rewards/top1``:
  the fraction of lists whose highest-reward response has the highest score;
  ``rewards/best``/``rewards/worst``: the mean implicit reward of each list's highest- and
  lowest-scored response, ``rewards/margins`` their difference; ``logps/best``,
  ``logps/worst``: the policy's log-probs of those responses.

  >>> import jax.numpy as jnp
  >>> m = ranking_metrics(jnp.array([[-1.0, -2.0, -3.0]]), jnp.zeros((1, 3)),
  ...                     jnp.array([[2.0, 0.0, 1.0]]))
  >>> round(float(m["rewards/ranking_accuracy"]), 4), float(m["rewards/top1"])
  (0.6667, 1.0)
  """
  p, r, v, m = _check_lists(policy_logps, ref_logps, scores, mask)
  beta = _pairs.check_beta(beta)
  p, r = jax.lax.stop_gradient(p), jax.lax.stop_gradient(r)
  rewards = jnp.where(m, beta * (p - r), -jnp.inf)
  pairs = _pairs_mask(v, m)
  right = pairs & (rewards[:, :, None] > rewards[:, None, :])
  best, worst = best_and_worst(v, m)
  top = jnp.argmax(rewards, axis=-1)
  top1 = _take(v, top) == _take(jnp.where(m, v, -jnp.inf), best)
  rb, rw = _take(rewards, best), _take(rewards, worst)
  return {"rewards/ranking_accuracy": jnp.sum(right) / jnp.maximum(jnp.sum(pairs), 1),
          "rewards/top1": jnp.mean(top1.astype(rewards.dtype)),
          "rewards/best": jnp.mean(rb), "rewards/worst": jnp.mean(rw),
          "rewards/margins": jnp.mean(rb - rw),
          "logps/best": jnp.mean(_take(p, best)), "logps/worst": jnp.mean(_take(p, worst))}
