"""Float64 NumPy references for the preference losses (jkd.losses.sequences, .dpo, .reference_free and .aligned_teacher).

Written from docs/methods.md §8-§10 and TRL's definitions of its DPO ``loss_type``s, independently
of the library's code: no JAX, no imports from jkd, loops where that makes a definition plainer.
Every function takes and returns float64 NumPy arrays.

Notation: ``pc, pr`` the policy's log-probs of the chosen and rejected completions, ``rc, rr``
the reference's; ``chosen = pc - rc``, ``rejected = pr - rr`` (the log-ratios) and ``h = chosen -
rejected``. ``e`` is the label smoothing. The only liberties taken with the printed formulas are
exact identities that keep float64 finite at extreme inputs: ``log sigmoid(x) = -log(1 + e^-x)``
via ``logaddexp``, ``sigmoid(x) = exp(log sigmoid(x))``, ``1 - sigmoid(x) = sigmoid(-x)``, and
``e^-x sigmoid(x / tau) = exp(-x + log sigmoid(x / tau))``.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE_INDEX = -100


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def log_sigmoid(x) -> np.ndarray:
  """``log(1 / (1 + exp(-x)))``."""
  return -np.logaddexp(0.0, -f64(x))


def sigmoid(x) -> np.ndarray:
  return np.exp(log_sigmoid(x))


def relu(x) -> np.ndarray:
  return np.maximum(f64(x), 0.0)


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
  z = f64(logits) / temperature
  m = np.max(z, axis=-1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


# ----------------------------------------------------------------------------------------------
# Sequence log-probabilities.
# ----------------------------------------------------------------------------------------------

def sequence_logprobs(logits, labels, *, where=None, ignore_index: int = IGNORE_INDEX,
                      temperature: float = 1.0):
  """``(sum, mean, count)``, each ``[B]``: ``log p(y|x) = sum_{t in C} log softmax(z_t / T)[y_t]``
  over the counted tokens ``C`` (label not ``ignore_index`` and ``where`` True); ``mean = sum /
  |C|`` (NaN for an empty completion)."""
  logits = f64(logits)
  labels = np.asarray(labels)
  batch, length = labels.shape
  total = np.zeros(batch)
  count = np.zeros(batch, dtype=np.int64)
  for b in range(batch):
    for t in range(length):
      if labels[b, t] == ignore_index or (where is not None and not where[b, t]):
        continue
      total[b] += log_softmax(logits[b, t], temperature)[labels[b, t]]
      count[b] += 1
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = np.where(count > 0, total / count, np.nan)
  return total, mean, count


# ----------------------------------------------------------------------------------------------
# TRL's DPO loss types: functions of (pc, pr, rc, rr).
# ----------------------------------------------------------------------------------------------

def _ratios(pc, pr, rc, rr):
  pc, pr, rc, rr = map(f64, (pc, pr, rc, rr))
  chosen = pc - rc
  rejected = pr - rr
  return chosen, rejected, chosen - rejected


def sigmoid_loss(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0):
  """DPO / cDPO: ``-(1-e) log s(b h) - e log s(-b h)``."""
  h = _ratios(pc, pr, rc, rr)[2]
  e = label_smoothing
  return -(1 - e) * log_sigmoid(beta * h) - e * log_sigmoid(-beta * h)


def robust_loss(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.1):
  """rDPO: ``[-(1-e) log s(b h) + e log s(-b h)] / (1 - 2e)``."""
  h = _ratios(pc, pr, rc, rr)[2]
  e = label_smoothing
  return (-(1 - e) * log_sigmoid(beta * h) + e * log_sigmoid(-beta * h)) / (1 - 2 * e)


def ipo_loss(pc, pr, rc, rr, *, beta=0.1):
  """``(h - 1/(2b))^2`` (on length-averaged log-probs)."""
  h = _ratios(pc, pr, rc, rr)[2]
  return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(pc, pr, rc, rr, *, beta=0.1):
  h = _ratios(pc, pr, rc, rr)[2]
  return relu(1.0 - beta * h)


def exo_pair_loss(pc, pr, rc, rr, *, beta=0.1, label_smoothing=1e-3):
  """``s(x)(log s(x) - log(1-e)) + s(-x)(log s(-x) - log e)``, ``x = b h``."""
  x = beta * _ratios(pc, pr, rc, rr)[2]
  e = label_smoothing
  return (sigmoid(x) * (log_sigmoid(x) - math.log(1 - e))
          + sigmoid(-x) * (log_sigmoid(-x) - math.log(e)))


def nca_pair_loss(pc, pr, rc, rr, *, beta=0.1):
  chosen, rejected, _ = _ratios(pc, pr, rc, rr)
  return (-log_sigmoid(beta * chosen) - 0.5 * log_sigmoid(-beta * chosen)
          - 0.5 * log_sigmoid(-beta * rejected))


def bco_pair_loss(pc, pr, rc, rr, *, beta=0.1, delta=0.0):
  chosen, rejected, _ = _ratios(pc, pr, rc, rr)
  return -log_sigmoid(beta * chosen - delta) - log_sigmoid(-(beta * rejected - delta))


def sppo_hard_loss(pc, pr, rc, rr, *, beta=0.1):
  chosen, rejected, _ = _ratios(pc, pr, rc, rr)
  return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def aot_loss(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0):
  """``d = sort(pc - pr) - sort(rc - rr)`` over the batch, then the smoothed sigmoid loss."""
  pc, pr, rc, rr = map(f64, (pc, pr, rc, rr))
  d = np.sort(pc - pr) - np.sort(rc - rr)
  e = label_smoothing
  return -(1 - e) * log_sigmoid(beta * d) - e * log_sigmoid(-beta * d)


def aot_unpaired_loss(pc, pr, rc, rr, *, beta=0.1, label_smoothing=0.0):
  """``d = sort(chosen) - sort(rejected)`` over the batch."""
  chosen, rejected, _ = _ratios(pc, pr, rc, rr)
  d = np.sort(chosen) - np.sort(rejected)
  e = label_smoothing
  return -(1 - e) * log_sigmoid(beta * d) - e * log_sigmoid(-beta * d)


def apo_zero_loss(pc, pr, rc, rr, *, beta=0.1):
  chosen, rejected, _ = _ratios(pc, pr, rc, rr)
  return 1.0 - sigmoid(beta * chosen) + sigmoid(beta * rejected)


def apo_down_loss(pc, pr, rc, rr, *, beta=0.1):
  chosen, _, h = _ratios(pc, pr, rc, rr)
  return sigmoid(beta * chosen) + 1.0 - sigmoid(beta * h)


def discopop_loss(pc, pr, rc, rr, *, beta=0.1, tau=0.05):
  """``x = b h``, ``m = s(x / tau)``: ``-log s(x) (1 - m) + e^-x m``."""
  x = beta * _ratios(pc, pr, rc, rr)[2]
  one_minus_m = sigmoid(-x / tau)
  exp_times_m = np.exp(-x + log_sigmoid(x / tau))
  return -log_sigmoid(x) * one_minus_m + exp_times_m


def sigmoid_norm_loss(pc, pr, rc, rr, *, beta=0.1):
  """``-log s(b h)`` (on length-averaged log-probs)."""
  return -log_sigmoid(beta * _ratios(pc, pr, rc, rr)[2])


def sft_loss(pc, pr=None, rc=None, rr=None):
  """``-log p(y_c|x)`` (length-averaged: the per-token NLL)."""
  return -f64(pc)


#: name -> (reference function, whether TRL feeds it length-averaged log-probs).
TRL_LOSSES = {
    "sigmoid": (sigmoid_loss, False),
    "robust": (robust_loss, False),
    "ipo": (ipo_loss, True),
    "hinge": (hinge_loss, False),
    "exo_pair": (exo_pair_loss, False),
    "nca_pair": (nca_pair_loss, False),
    "bco_pair": (bco_pair_loss, False),
    "sppo_hard": (sppo_hard_loss, False),
    "aot": (aot_loss, False),
    "aot_unpaired": (aot_unpaired_loss, False),
    "apo_zero": (apo_zero_loss, False),
    "apo_down": (apo_down_loss, False),
    "discopop": (discopop_loss, False),
    "sigmoid_norm": (sigmoid_norm_loss, True),
    "sft": (sft_loss, True),
}


def trl_loss(name: str, pc, pr, rc, rr, **options) -> np.ndarray:
  return TRL_LOSSES[name][0](pc, pr, rc, rr, **options)


# ----------------------------------------------------------------------------------------------
# Reference-free losses.
# ----------------------------------------------------------------------------------------------

def simpo_loss(avg_c, avg_r, *, beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.0):
  """``x = b (avg_c - avg_r) - gamma``, ``gamma = b * ratio``; ``-(1-e) log s(x) - e log s(-x)``."""
  x = beta * (f64(avg_c) - f64(avg_r)) - beta * gamma_beta_ratio
  e = label_smoothing
  return -(1 - e) * log_sigmoid(x) - e * log_sigmoid(-x)


def cpo_loss(pc, pr, *, beta=0.1, label_smoothing=0.0, chosen_nll=None, alpha=1.0):
  x = beta * (f64(pc) - f64(pr))
  e = label_smoothing
  loss = -(1 - e) * log_sigmoid(x) - e * log_sigmoid(-x)
  if chosen_nll is not None:
    loss = loss + alpha * f64(chosen_nll)
  return loss


def log1mexp(x) -> np.ndarray:
  """``log(1 - e^x)`` for ``x < 0`` (``expm1`` keeps it exact near 0)."""
  return np.log(-np.expm1(f64(x)))


def orpo_log_odds_ratio(lc, lr) -> np.ndarray:
  """``log(p_c / (1 - p_c)) - log(p_r / (1 - p_r))`` with ``p = e^l``."""
  lc, lr = f64(lc), f64(lr)
  return (lc - log1mexp(lc)) - (lr - log1mexp(lr))


def orpo_loss(lc, lr, *, lam=0.1, chosen_nll=None):
  nll = -f64(lc) if chosen_nll is None else f64(chosen_nll)
  return nll - lam * log_sigmoid(orpo_log_odds_ratio(lc, lr))


def kto_kl_estimate(policy_kl_logps, ref_kl_logps) -> float:
  """``z = max(0, mean(policy - ref))`` over the mismatched pairs."""
  return max(0.0, float(np.mean(f64(policy_kl_logps) - f64(ref_kl_logps))))


def kto_loss(policy_logps, ref_logps, desirable, *, kl, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0):
  r = f64(policy_logps) - f64(ref_logps)
  out = np.zeros(r.shape)
  for i in range(r.shape[0]):
    if desirable[i]:
      out[i] = desirable_weight * (1.0 - sigmoid(beta * (r[i] - kl)))
    else:
      out[i] = undesirable_weight * (1.0 - sigmoid(beta * (kl - r[i])))
  return out


def redi_loss(pos_avg, neg_avg, *, c_pos=1.0, c_neg=0.8):
  return -c_pos * f64(pos_avg) + c_neg * f64(neg_avg)


# ----------------------------------------------------------------------------------------------
# Distillation-flavoured preference losses.
# ----------------------------------------------------------------------------------------------

def topk_forward_kl(student_logits, ids, teacher_logprobs) -> np.ndarray:
  """``KL(p || q)`` over ``k + 1`` bins per position: the teacher's top-k ids and one tail bin
  holding the remaining mass (``1 - sum`` of the bins) of each distribution."""
  zs = f64(student_logits)
  ids = np.asarray(ids)
  lp = f64(teacher_logprobs)
  out = np.zeros(zs.shape[:-1])
  for idx in np.ndindex(zs.shape[:-1]):
    q_full = np.exp(log_softmax(zs[idx]))
    p = np.exp(lp[idx])
    q = q_full[ids[idx]]
    outside = np.ones(zs.shape[-1], dtype=bool)
    outside[ids[idx]] = False
    p = np.append(p, 1.0 - p.sum())
    q = np.append(q, q_full[outside].sum())
    out[idx] = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)
  return out


def dckd_loss(chosen_logits, chosen_labels, chosen_ids, chosen_lp, rejected_logits,
              rejected_labels, rejected_ids, rejected_lp, *, kd_weight=0.1):
  """``NLL(y_w) + w [FKL(y_w) + FKL(y_l)]``, each a per-sequence mean over completion tokens."""
  def token_mean(values, labels):
    mask = np.asarray(labels) != IGNORE_INDEX
    return np.array([values[b][mask[b]].mean() if mask[b].any() else 0.0
                     for b in range(values.shape[0])])
  _, avg_c, _ = sequence_logprobs(chosen_logits, chosen_labels)
  kd_c = token_mean(topk_forward_kl(chosen_logits, chosen_ids, chosen_lp), chosen_labels)
  kd_r = token_mean(topk_forward_kl(rejected_logits, rejected_ids, rejected_lp), rejected_labels)
  return -avg_c + kd_weight * (kd_c + kd_r)


def adpa_advantage(student_logits, ids, teacher_logprobs, teacher_ref_logprobs, *, where=None):
  """``-sum_{a in topk} q(a|s) (log pi_t(a|s) - log pi_tref(a|s))`` per position (0 masked)."""
  zs = f64(student_logits)
  out = np.zeros(zs.shape[:-1])
  for idx in np.ndindex(zs.shape[:-1]):
    if where is not None and not where[idx]:
      continue
    q = np.exp(log_softmax(zs[idx]))
    total = 0.0
    for a, lt, lr in zip(np.asarray(ids)[idx], f64(teacher_logprobs)[idx],
                         f64(teacher_ref_logprobs)[idx]):
      total += q[a] * (lt - lr)
    out[idx] = -total
  return out


# ----------------------------------------------------------------------------------------------
# Metrics and numerical differentiation.
# ----------------------------------------------------------------------------------------------

def preference_metrics(pc, pr, rc=None, rr=None, *, beta=0.1) -> dict[str, float]:
  pc, pr = f64(pc), f64(pr)
  rc = np.zeros_like(pc) if rc is None else f64(rc)
  rr = np.zeros_like(pr) if rr is None else f64(rr)
  chosen, rejected = beta * (pc - rc), beta * (pr - rr)
  return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
          "rewards/margins": (chosen - rejected).mean(),
          "rewards/accuracies": (chosen > rejected).mean(),
          "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


def numerical_grad(f, x, eps: float = 1e-6) -> np.ndarray:
  """Central-difference gradient of ``sum(f(x))`` wrt ``x`` (any shape), float64.

  The step is relative to ``|x|`` (at least ``eps``) so that entries of size 1e4 are perturbed
  by more than their float64 rounding.
  """
  x = f64(x).copy()
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    orig = x[idx]
    step = eps * max(1.0, abs(orig))
    x[idx] = orig + step
    hi = f64(f(x))
    x[idx] = orig - step
    lo = f64(f(x))
    x[idx] = orig
    # Difference first, then sum: entries that do not depend on x[idx] cancel exactly, so
    # large unrelated entries (1e8) add no rounding error.
    grad[idx] = np.sum(hi - lo) / (2 * step)
  return grad
