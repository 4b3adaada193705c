"""Float64 NumPy references for the tests of ``jkd.losses``.

Written from the formulas of docs/methods.md §1-§4 (and the usual definitions of token
log-probabilities, cross-entropy and label smoothing), independently of the library's code: no
JAX, no shared helpers, loops where that makes the definition plainer. Every function takes and
returns float64 NumPy arrays; ``-inf`` logits (banned tokens) are handled with ``0 log 0 = 0``.

Conventions (docs/methods.md §0): ``q = softmax(zs / T)`` is the student, ``p = softmax(zt /
T)`` the teacher; every token-level divergence is multiplied by ``T**2``.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE_INDEX = -100


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Probabilities.
# ----------------------------------------------------------------------------------------------

def logsumexp(x, axis=-1, keepdims=False) -> np.ndarray:
  """``log sum exp x`` along ``axis``; ``-inf`` when every entry is ``-inf``."""
  x = f64(x)
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
  return out if keepdims else np.squeeze(out, axis=axis)


def log_softmax(logits, temperature: float = 1.0) -> np.ndarray:
  """``log softmax(logits / T)`` over the last axis."""
  z = f64(logits) / temperature
  with np.errstate(invalid="ignore"):  # a row of only -inf has no distribution: NaN
    return z - logsumexp(z, keepdims=True)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
  return np.exp(log_softmax(logits, temperature))


def _log(x) -> np.ndarray:
  with np.errstate(divide="ignore"):
    return np.log(f64(x))


# ----------------------------------------------------------------------------------------------
# Divergences between two distributions, given as log-probabilities over the last axis.
# ``log_q`` is the student's, ``log_p`` the teacher's (docs/methods.md §1).
# ----------------------------------------------------------------------------------------------

def kl(log_a, log_b) -> np.ndarray:
  """``KL(a || b) = sum_v a_v (log a_v - log b_v)``, terms with ``a_v = 0`` being 0.

  ``+inf`` where ``a`` puts mass on a token ``b`` excludes.
  """
  log_a, log_b = np.broadcast_arrays(f64(log_a), f64(log_b))
  a = np.exp(log_a)
  terms = np.zeros_like(a)
  pos = a > 0
  terms[pos] = a[pos] * (log_a[pos] - log_b[pos])
  return terms.sum(axis=-1)


def log_mixture(log_a, log_b, weight_a: float) -> np.ndarray:
  """``log(w a + (1 - w) b)`` from log-probabilities."""
  if weight_a == 0.0:
    return f64(log_b)
  if weight_a == 1.0:
    return f64(log_a)
  return np.logaddexp(f64(log_a) + math.log(weight_a), f64(log_b) + math.log(1.0 - weight_a))


def forward_kl(log_q, log_p) -> np.ndarray:
  """``KL(p || q)``."""
  return kl(log_p, log_q)


def reverse_kl(log_q, log_p) -> np.ndarray:
  """``KL(q || p)``."""
  return kl(log_q, log_p)


def generalized_jsd(log_q, log_p, *, beta: float = 0.5) -> np.ndarray:
  """``beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q``.

  TRL convention: ``beta = 0`` is forward KL, ``beta = 1`` is reverse KL.
  """
  if beta == 0.0:
    return forward_kl(log_q, log_p)
  if beta == 1.0:
    return reverse_kl(log_q, log_p)
  log_m = log_mixture(log_p, log_q, beta)
  return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def skew_kl(log_q, log_p, *, alpha: float = 0.1) -> np.ndarray:
  """``KL(p || alpha p + (1 - alpha) q)``."""
  return kl(log_p, log_mixture(log_p, log_q, alpha))


def skew_reverse_kl(log_q, log_p, *, alpha: float = 0.1) -> np.ndarray:
  """``KL(q || (1 - alpha) p + alpha q)``."""
  return kl(log_q, log_mixture(log_q, log_p, alpha))


def total_variation(log_q, log_p) -> np.ndarray:
  """``0.5 sum |p - q|``."""
  return 0.5 * np.sum(np.abs(np.exp(f64(log_p)) - np.exp(f64(log_q))), axis=-1)


def akl_head(p, mu: float) -> np.ndarray:
  """Boolean head mask of one teacher distribution ``p [V]`` (AKL).

  Walk the tokens in descending teacher probability, adding each to the head, until the
  cumulative probability reaches ``mu`` (the crossing token is added). Tokens whose probability
  equals the last head token's are in the head too.
  """
  p = f64(p)
  order = sorted(range(p.shape[0]), key=lambda v: -p[v])
  head = np.zeros(p.shape[0], dtype=bool)
  total = 0.0
  last = None
  for v in order:
    head[v] = True
    total += p[v]
    last = p[v]
    if total >= mu:
      break
  head |= p == last
  return head


def adaptive_kl_weights(log_q, log_p, *, mu: float = 0.5) -> np.ndarray:
  """``[..., 2]`` weights ``(g_h, g_t) / (g_h + g_t)`` of forward and reverse KL."""
  log_q, log_p = f64(log_q), f64(log_p)
  q, p = np.exp(log_q), np.exp(log_p)
  flat_q = q.reshape(-1, q.shape[-1])
  flat_p = p.reshape(-1, p.shape[-1])
  out = np.zeros((flat_q.shape[0], 2))
  for i, (qi, pi) in enumerate(zip(flat_q, flat_p)):
    head = akl_head(pi, mu)
    gap = np.abs(pi - qi)
    g_h, g_t = gap[head].sum(), gap[~head].sum()
    out[i] = (g_h / (g_h + g_t), g_t / (g_h + g_t)) if g_h + g_t > 0 else (0.5, 0.5)
  return out.reshape(q.shape[:-1] + (2,))


def adaptive_kl(log_q, log_p, *, mu: float = 0.5, weights=None) -> np.ndarray:
  """``w_h KL(p || q) + w_t KL(q || p)`` with the AKL head/tail weights.

  ``weights`` (``[..., 2]``) freezes the weights, as the stop-gradient does for the gradient.
  """
  if weights is None:
    weights = adaptive_kl_weights(log_q, log_p, mu=mu)
  fkl, rkl = forward_kl(log_q, log_p), reverse_kl(log_q, log_p)
  w_h, w_t = weights[..., 0], weights[..., 1]
  # A zero weight kills its term even when that KL is infinite.
  return (np.where(w_h > 0, w_h * np.where(w_h > 0, fkl, 0.0), 0.0)
          + np.where(w_t > 0, w_t * np.where(w_t > 0, rkl, 0.0), 0.0))


def entropy(log_a) -> np.ndarray:
  """``H(a) = -sum_v a_v log a_v`` over the last axis, terms with ``a_v = 0`` being 0."""
  log_a = f64(log_a)
  a = np.exp(log_a)
  terms = np.zeros_like(a)
  pos = a > 0
  terms[pos] = -a[pos] * log_a[pos]
  return terms.sum(axis=-1)


def balanced_kl_weights(log_q, log_p) -> np.ndarray:
  """``[..., 2]`` BD-KD weights ``(H(p), H(q)) / (H(p) + H(q))`` of forward and reverse KL;
  ``(1/2, 1/2)`` when both entropies are 0."""
  h_q, h_p = entropy(log_q), entropy(log_p)
  total = h_q + h_p
  safe = np.where(total > 0, total, 1.0)
  return np.stack([np.where(total > 0, h_p / safe, 0.5), np.where(total > 0, h_q / safe, 0.5)],
                  axis=-1)


def balanced_kl(log_q, log_p, *, weights=None) -> np.ndarray:
  """BD-KD: ``w_f KL(p || q) + w_r KL(q || p)``, the weights from the two entropies.

  ``weights`` (``[..., 2]``) freezes them, as the stop-gradient does for the gradient.
  """
  if weights is None:
    weights = balanced_kl_weights(log_q, log_p)
  fkl, rkl = forward_kl(log_q, log_p), reverse_kl(log_q, log_p)
  w_f, w_r = weights[..., 0], weights[..., 1]
  # A zero weight kills its term even when that KL is infinite.
  return (np.where(w_f > 0, w_f * np.where(w_f > 0, fkl, 0.0), 0.0)
          + np.where(w_r > 0, w_r * np.where(w_r > 0, rkl, 0.0), 0.0))


def _scaled(coef: float, z) -> np.ndarray:
  """``coef * z`` with ``0 * (-inf) = 0`` (a zero-weight endpoint does not contribute)."""
  z = f64(z)
  return np.zeros_like(z) if coef == 0.0 else coef * z


def taid_target(log_q, log_p, *, t: float) -> np.ndarray:
  """TAID's target ``softmax((1 - t) log q + t log p)``, as log-probabilities.

  Over the full vocabulary this equals ``softmax(((1 - t) zs + t zt) / T)`` (see
  :func:`taid_target_from_logits`): log-probabilities differ from ``logits / T`` by a per-row
  constant. Over sparse bins, the bins' log-probabilities play the role of the logits.
  """
  return log_softmax(_scaled(1.0 - t, log_q) + _scaled(t, log_p))


def taid(log_q, log_p, *, t: float, target=None) -> np.ndarray:
  """``KL(p_t || q)``; ``target`` (log-probs) freezes ``p_t`` as the stop-gradient does."""
  if target is None:
    target = taid_target(log_q, log_p, t=t)
  return kl(target, log_q)


def taid_target_from_logits(student_logits, teacher_logits, *, t: float,
                            temperature: float = 1.0) -> np.ndarray:
  """docs/methods.md §2.1: ``p_t = softmax(((1 - t) zs + t zt) / T)`` (log-probabilities)."""
  return log_softmax(_scaled(1.0 - t, student_logits) + _scaled(t, teacher_logits), temperature)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "adaptive_kl": adaptive_kl,
    "balanced_kl": balanced_kl,
    "taid": taid,
}

#: Divergences and option sets the tests run: ``(test id, name, options)``.
SPECS = [
    ("forward_kl", "forward_kl", {}),
    ("reverse_kl", "reverse_kl", {}),
    ("jsd_b0", "generalized_jsd", {"beta": 0.0}),
    ("jsd_b0.5", "generalized_jsd", {"beta": 0.5}),
    ("jsd_b0.9", "generalized_jsd", {"beta": 0.9}),
    ("jsd_b1", "generalized_jsd", {"beta": 1.0}),
    ("skew_kl", "skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", "skew_reverse_kl", {"alpha": 0.1}),
    ("total_variation", "total_variation", {}),
    ("akl_mu0.5", "adaptive_kl", {"mu": 0.5}),
    ("akl_mu0.9", "adaptive_kl", {"mu": 0.9}),
    ("balanced_kl", "balanced_kl", {}),
    ("taid_t0.4", "taid", {"t": 0.4}),
    ("taid_t1", "taid", {"t": 1.0}),
]

#: One spec per divergence name (for the sparse and fused forms, which share the cores).
ONE_PER_NAME = [s for s in SPECS if s[0] in (
    "forward_kl", "reverse_kl", "jsd_b0.5", "skew_kl", "skew_reverse_kl", "total_variation",
    "akl_mu0.5", "balanced_kl", "taid_t0.4")]

#: Divergences whose value is a fixed function of the student (no stop-gradient inside).
NO_STOP_GRADIENT = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                    "total_variation")

#: f-divergences: coarsening the vocabulary into bins can only lower them (data processing).
F_DIVERGENCES = NO_STOP_GRADIENT


def divergence(name: str, log_q, log_p, **options) -> np.ndarray:
  """The named divergence between two distributions given as log-probabilities."""
  return DIVERGENCES[name](log_q, log_p, **options)


def full_divergence(name: str, student_logits, teacher_logits, *, temperature: float = 1.0,
                    where=None, **options) -> np.ndarray:
  """The named divergence from full logits, times ``T**2``, zero where ``where`` is False."""
  log_q = log_softmax(student_logits, temperature)
  log_p = log_softmax(teacher_logits, temperature)
  if name == "taid":
    target = options.pop("target", None)
    if target is None:
      target = taid_target_from_logits(student_logits, teacher_logits, t=options["t"],
                                       temperature=temperature)
    values = kl(target, log_q)
  else:
    values = divergence(name, log_q, log_p, **options)
  values = values * temperature ** 2
  if where is not None:
    values = np.where(where, values, 0.0)
  return values


def frozen_options(name: str, student_logits, teacher_logits, *, temperature: float = 1.0,
                   **options) -> dict:
  """Options that freeze the stop-gradient parts at the given point (AKL and BD-KD weights, TAID
  target)."""
  options = dict(options)
  if name == "adaptive_kl":
    options["weights"] = adaptive_kl_weights(log_softmax(student_logits, temperature),
                                             log_softmax(teacher_logits, temperature),
                                             mu=options.get("mu", 0.5))
  elif name == "balanced_kl":
    options["weights"] = balanced_kl_weights(log_softmax(student_logits, temperature),
                                             log_softmax(teacher_logits, temperature))
  elif name == "taid":
    options["target"] = taid_target_from_logits(student_logits, teacher_logits, t=options["t"],
                                                temperature=temperature)
  return options


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) teacher, docs/methods.md §3.
# ----------------------------------------------------------------------------------------------

def topk(teacher_logits, k: int):
  """The teacher's top-k ids (descending probability) and their log-probs at temperature 1."""
  logp = log_softmax(teacher_logits)
  ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  return ids, np.take_along_axis(logp, ids, axis=-1)


def sparse_bins(student_logits, ids, teacher_logprobs, *, tail: bool = True,
                temperature: float = 1.0, teacher_tail_logprob=None):
  """Student and teacher log-probabilities over the sparse bins ``[..., k]`` or ``[..., k+1]``.

  Student: ``q = softmax(zs / T)`` exactly, gathered at the ids; plus its remaining mass as a
  tail bin, or renormalised over the ids without a tail. Teacher: the stored temperature-1
  probabilities at the ids, plus ``1 - sum`` of them as the tail bin; then tempered as
  ``b^(1/T) / sum b^(1/T)`` over the bins. With ``k = V`` there is no tail bin.
  """
  zs = f64(student_logits)
  ids = np.asarray(ids).astype(np.int64)
  lp = f64(teacher_logprobs)
  vocab, k = zs.shape[-1], ids.shape[-1]
  log_q = log_softmax(zs, temperature)
  lq_ids = np.take_along_axis(log_q, ids, axis=-1)
  if tail and k < vocab:
    inside = np.zeros(zs.shape, dtype=bool)
    np.put_along_axis(inside, ids, True, axis=-1)
    lq_tail = logsumexp(np.where(inside, -np.inf, log_q), keepdims=True)
    student = np.concatenate([lq_ids, lq_tail], axis=-1)
    if teacher_tail_logprob is None:
      lp_tail = _log(np.maximum(1.0 - np.exp(lp).sum(axis=-1, keepdims=True), 0.0))
    else:
      lp_tail = f64(teacher_tail_logprob)[..., None]
    lp = np.concatenate([lp, lp_tail], axis=-1)
  else:
    student = lq_ids - logsumexp(lq_ids, keepdims=True)
  # Temper the stored (temperature-1) teacher bins: divide by T, renormalise over the bins.
  teacher = log_softmax(lp, temperature)
  return student, teacher


def sparse_divergence(name: str, student_logits, ids, teacher_logprobs, *, tail: bool = True,
                      temperature: float = 1.0, teacher_tail_logprob=None, where=None,
                      **options) -> np.ndarray:
  """The named divergence over the sparse bins, times ``T**2``."""
  student, teacher = sparse_bins(student_logits, ids, teacher_logprobs, tail=tail,
                                 temperature=temperature,
                                 teacher_tail_logprob=teacher_tail_logprob)
  values = divergence(name, student, teacher, **options) * temperature ** 2
  if where is not None:
    values = np.where(where, values, 0.0)
  return values


# ----------------------------------------------------------------------------------------------
# Tokens and reductions.
# ----------------------------------------------------------------------------------------------

def token_logprobs(logits, labels, *, temperature: float = 1.0, ignore_index: int = IGNORE_INDEX,
                   where=None) -> np.ndarray:
  """``log softmax(z / T)[y]`` per position; 0 where ``y == ignore_index`` or ``where`` is False."""
  logp = log_softmax(logits, temperature)
  labels = np.asarray(labels)
  out = np.zeros(labels.shape)
  for idx in np.ndindex(labels.shape):
    if labels[idx] != ignore_index and (where is None or where[idx]):
      out[idx] = logp[idx][labels[idx]]
  return out


def cross_entropy(logits, labels, *, ignore_index: int = IGNORE_INDEX, where=None,
                  label_smoothing: float = 0.0) -> np.ndarray:
  """``-sum_v y_v log q_v`` with the smoothed target ``y = (1 - e) onehot + e / V``."""
  logq = log_softmax(logits)
  labels = np.asarray(labels)
  vocab = logq.shape[-1]
  out = np.zeros(labels.shape)
  for idx in np.ndindex(labels.shape):
    if labels[idx] != ignore_index and (where is None or where[idx]):
      target = np.full(vocab, label_smoothing / vocab)
      target[labels[idx]] += 1.0 - label_smoothing
      with np.errstate(invalid="ignore"):  # 0 * -inf, discarded by the where
        out[idx] = -np.sum(np.where(target > 0, target * logq[idx], 0.0))
  return out


def masked_mean(values, where=None) -> float:
  values = f64(values)
  if where is None:
    return float(values.mean())
  where = np.asarray(where, bool)
  return float(values[where].mean()) if where.any() else 0.0


def sequence_sum(values, where=None) -> np.ndarray:
  values = f64(values)
  if where is not None:
    values = np.where(where, values, 0.0)
  return values.sum(axis=-1)


def sequence_mean(values, where=None) -> np.ndarray:
  values = f64(values)
  if where is None:
    return values.mean(axis=-1)
  where = np.asarray(where, bool)
  count = where.sum(axis=-1)
  return np.where(count > 0, sequence_sum(values, where) / np.maximum(count, 1), 0.0)


# ----------------------------------------------------------------------------------------------
# TAID schedule, docs/methods.md §2.2.
# ----------------------------------------------------------------------------------------------

def sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x))


def taid_schedule(losses, *, total_steps: int, t_start: float = 0.4, t_end: float = 1.0,
                  alpha: float = 5e-4, beta: float = 0.99, first_step: int = 0):
  """The state ``(t, m, prev)`` after each update, the update at index ``i`` being step
  ``first_step + i`` with loss ``losses[i]``."""
  t, m, prev = t_start, 0.0, None
  states = []
  for i, loss in enumerate(losses):
    step = first_step + i
    if prev is not None:
      rel = (prev - loss) / (prev + 1e-15)
      m = beta * m + (1.0 - beta) * rel
      delta = alpha * sigmoid(m) * (1.0 - t)
      t_lin = t_start + (t_end - t_start) * step / total_steps
      t = min(t_end, max(t_lin, t + delta))
    prev = loss
    states.append((t, m, prev))
  return states


# ----------------------------------------------------------------------------------------------
# Numerical differentiation.
# ----------------------------------------------------------------------------------------------

def numerical_grad(f, x, eps: float = 1e-6) -> np.ndarray:
  """Central-difference gradient of ``sum(f(x))`` wrt ``x [..., V]``, float64.

  ``f`` maps ``[..., V]`` to per-position values ``[...]``, each depending on its own position
  only (true of every token-level loss), so one vocabulary entry is perturbed at all positions
  at once: ``2 V`` evaluations instead of ``2 x.size``.
  """
  x = f64(x).copy()
  grad = np.zeros_like(x)
  for v in range(x.shape[-1]):
    orig = x[..., v].copy()
    x[..., v] = orig + eps
    hi = f(x)
    x[..., v] = orig - eps
    lo = f(x)
    x[..., v] = orig
    grad[..., v] = (hi - lo) / (2 * eps)
  return grad
