"""Float64 NumPy references for QCRD and the generate-filter-self-imitate keep rule.

Written from docs/methods.md §17-§18, independently of the library's code: no JAX, no imports
from jkd, loops where that makes a definition plainer.
"""

from __future__ import annotations

import math

import numpy as np


def qcrd_loss(pos, neg, *, wp=None, wn=None, mask=None, lam=1.0, clip=-1e-7):
  """``-wp * pos - lam * mean_{valid k} wn_k * log(1 - exp(min(neg_k, clip)))`` per example.

  ``pos`` ``[B]``, ``neg`` ``[B, K]`` length-averaged log-probs; weights default to 1, the mask
  to all True; an example without a valid negative keeps the positive part alone.
  """
  pos = np.asarray(pos, np.float64)
  neg = np.asarray(neg, np.float64).reshape(len(pos), -1)
  wp = np.ones_like(pos) if wp is None else np.asarray(wp, np.float64)
  wn = np.ones_like(neg) if wn is None else np.asarray(wn, np.float64).reshape(neg.shape)
  mask = np.ones(neg.shape, bool) if mask is None else np.asarray(mask, bool).reshape(neg.shape)
  out = np.zeros(len(pos))
  for i in range(len(pos)):
    terms = [wn[i, k] * -math.log(1.0 - math.exp(min(neg[i, k], clip)))
             for k in range(neg.shape[1]) if mask[i, k]]
    out[i] = -wp[i] * pos[i] + lam * (sum(terms) / len(terms) if terms else 0.0)
  return out


def numerical_grad(f, x, eps=1e-6):
  """Central differences of a scalar ``f`` at ``x`` (float64)."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    g[idx] = (f(up) - f(down)) / (2 * eps)
  return g


def keep_mask(scores, keep_fraction=1.0, threshold=None):
  """Keep the ``ceil(f N)`` best (ties: the earlier one), then those at least ``threshold``."""
  scores = [float(s) for s in scores]
  n = len(scores)
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  top = set(order[:math.ceil(keep_fraction * n - 1e-9)])
  return np.array([i in top and (threshold is None or scores[i] >= threshold)
                   for i in range(n)])
