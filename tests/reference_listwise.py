"""Float64 NumPy references for TPO's preference-list ranking (jkd.losses.listwise).

Written from the formula of docs/methods.md §8.16 (Liao et al., *TPO*, arXiv:2410.12854, with
LiPO-lambda's pair weights), independently of the library's code: plain Python loops over lists
and pairs, no JAX, no imports from jkd. Inputs are ``[B, K]`` arrays: policy and reference
summed log-probs, scores (higher is better) and a bool mask of the present responses.
"""

from __future__ import annotations

import math

import numpy as np


def neg_log_sigmoid(x: float) -> float:
  """``-log(1 / (1 + e^-x))``, finite for large ``|x|``."""
  return float(np.logaddexp(0.0, -x))


def ranks(rewards, mask) -> np.ndarray:
  """1-based rank of each present response by reward, best first, ties to the lower index;
  absent responses after all present ones (in index order)."""
  rewards, mask = np.asarray(rewards, np.float64), np.asarray(mask, bool)
  out = np.zeros(rewards.shape, np.int64)
  for b in range(rewards.shape[0]):
    present = [i for i in range(rewards.shape[1]) if mask[b, i]]
    absent = [i for i in range(rewards.shape[1]) if not mask[b, i]]
    order = sorted(present, key=lambda i: (-rewards[b, i], i)) + absent
    for position, i in enumerate(order):
      out[b, i] = position + 1
  return out


def gain(v: float, kind: str) -> float:
  return 2.0 ** v - 1.0 if kind == "exp2" else v


def tpo_loss(policy, ref, scores, mask=None, *, beta=0.1, weighting="lambda",
             gain_kind="exp2") -> np.ndarray:
  """``[B]``: sum over present pairs with ``v_i > v_j`` of ``w_ij * -log sigmoid(r_i - r_j)``,
  ``r = beta (policy - ref)``; ``w_ij = |G_i - G_j| |1/log2(1 + tau_i) - 1/log2(1 + tau_j)|``
  (``lambda``) or ``1 / #pairs`` (``uniform``)."""
  policy, ref, scores = (np.asarray(x, np.float64) for x in (policy, ref, scores))
  mask = np.ones(policy.shape, bool) if mask is None else np.asarray(mask, bool)
  rewards = np.where(mask, beta * (policy - ref), 0.0)
  tau = ranks(rewards, mask)
  out = np.zeros(policy.shape[0])
  for b in range(policy.shape[0]):
    pairs = [(i, j) for i in range(policy.shape[1]) for j in range(policy.shape[1])
             if mask[b, i] and mask[b, j] and scores[b, i] > scores[b, j]]
    for i, j in pairs:
      if weighting == "lambda":
        w = (abs(gain(scores[b, i], gain_kind) - gain(scores[b, j], gain_kind))
             * abs(1 / math.log2(1 + tau[b, i]) - 1 / math.log2(1 + tau[b, j])))
      else:
        w = 1.0 / len(pairs)
      out[b] += w * neg_log_sigmoid(rewards[b, i] - rewards[b, j])
  return out


def ranking_metrics(policy, ref, scores, mask=None, *, beta=0.1) -> dict[str, float]:
  """The metrics of ``jkd.losses.ranking_metrics`` (their definitions, docs/methods.md §8.16)."""
  policy, ref, scores = (np.asarray(x, np.float64) for x in (policy, ref, scores))
  mask = np.ones(policy.shape, bool) if mask is None else np.asarray(mask, bool)
  rewards = beta * (policy - ref)
  right = total = 0
  best_r, worst_r, best_p, worst_p, top1 = [], [], [], [], []
  for b in range(policy.shape[0]):
    present = [i for i in range(policy.shape[1]) if mask[b, i]]
    for i in present:
      for j in present:
        if scores[b, i] > scores[b, j]:
          total += 1
          right += rewards[b, i] > rewards[b, j]
    best = max(present, key=lambda i: (scores[b, i], -i))
    worst = min(present, key=lambda i: (scores[b, i], i))
    top = max(present, key=lambda i: (rewards[b, i], -i))
    best_r.append(rewards[b, best])
    worst_r.append(rewards[b, worst])
    best_p.append(policy[b, best])
    worst_p.append(policy[b, worst])
    top1.append(scores[b, top] == scores[b, best])
  return {"rewards/ranking_accuracy": right / max(total, 1), "rewards/top1": np.mean(top1),
          "rewards/best": np.mean(best_r), "rewards/worst": np.mean(worst_r),
          "rewards/margins": np.mean(np.subtract(best_r, worst_r)),
          "logps/best": np.mean(best_p), "logps/worst": np.mean(worst_p)}


def numerical_grad(f, x, eps: float = 1e-6) -> np.ndarray:
  """Central differences of the scalar ``f`` at ``x`` (float64)."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    g[idx] = (f(hi) - f(lo)) / (2 * eps)
  return g
