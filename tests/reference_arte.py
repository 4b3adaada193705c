"""Float64 NumPy reference of ARTE's ranking signal (docs/methods.md §19), on a bigram model.

The model's logits at a position are the row ``W[x_t]`` of a ``[V, V]`` table, so the loss and
its gradient have closed forms:

  L(W; B) = -1/|M| sum_{(n,t) in M} log softmax(W[x_{n,t}])[y_{n,t}]
  dL/dW[a] = 1/|M| sum_{(n,t) in M, x_{n,t} = a} (softmax(W[a]) - onehot(y_{n,t}))

and the gain of a draft ``d`` is ``L(W_0; V) - L(W_k; V)`` with ``W_{j+1} = W_j - lr dL/dW(W_j;
d)``. Written from the formulas, not from jkd's code.
"""

from __future__ import annotations

import numpy as np


def _logsoftmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _mask(batch) -> np.ndarray:
  mask = np.asarray(batch["labels"]) != -100
  if "loss_mask" in batch:
    mask &= np.asarray(batch["loss_mask"], bool)
  return mask


def bigram_nll(w: np.ndarray, batch) -> float:
  """Token-weighted mean NLL of ``batch`` (``tokens``, ``labels``, ``loss_mask`` [B, T])."""
  w = np.asarray(w, np.float64)
  tokens, labels, mask = np.asarray(batch["tokens"]), np.asarray(batch["labels"]), _mask(batch)
  logp = _logsoftmax(w[tokens])
  picked = np.take_along_axis(logp, np.where(mask, labels, 0)[..., None], -1)[..., 0]
  return float(-(picked * mask).sum() / max(mask.sum(), 1))


def bigram_grad(w: np.ndarray, batch) -> np.ndarray:
  """``dL/dW`` of :func:`bigram_nll` (closed form)."""
  w = np.asarray(w, np.float64)
  tokens, labels, mask = np.asarray(batch["tokens"]), np.asarray(batch["labels"]), _mask(batch)
  count = max(mask.sum(), 1)
  grad = np.zeros_like(w)
  for n, t in zip(*np.nonzero(mask)):
    p = np.exp(_logsoftmax(w[tokens[n, t]]))
    p[labels[n, t]] -= 1.0
    grad[tokens[n, t]] += p / count
  return grad


def lookahead_gain(w: np.ndarray, draft, validation, *, lr: float, steps: int = 1) -> float:
  """``L(W_0; V) - L(W_k; V)`` after ``steps`` SGD steps of ``lr`` on ``draft`` ([1, T])."""
  current = np.asarray(w, np.float64).copy()
  for _ in range(steps):
    current = current - lr * bigram_grad(current, draft)
  return bigram_nll(w, validation) - bigram_nll(current, validation)
