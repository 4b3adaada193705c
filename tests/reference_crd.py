"""Float64 NumPy references for CRD (docs/methods.md §5.7), written from the formulas.

No JAX, no shared helpers with the library; loops where that makes the definition plainer.
"""

from __future__ import annotations

import numpy as np


def f64(x) -> np.ndarray:
  return np.asarray(x, dtype=np.float64)


def unit(x) -> np.ndarray:
  """Rows scaled to unit L2 norm (a zero row, e.g. an empty sequence's, stays 0)."""
  x = f64(x)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def info_nce_one_side(anchors, positives, *, temperature, where=None, bank=None,
                      bank_where=None) -> np.ndarray:
  """``-log( e^{a_i.p_i/tau} / (sum_{j counted} e^{a_i.p_j/tau} + sum_{m valid} e^{a_i.b_m/tau}) )``
  per anchor ``i`` (unit vectors), 0 for uncounted anchors."""
  a, p = unit(anchors), unit(positives)
  n = a.shape[0]
  where = np.ones(n, bool) if where is None else np.asarray(where, bool)
  out = np.zeros(n)
  for i in range(n):
    if not where[i]:
      continue
    scores = [a[i] @ p[j] / temperature for j in range(n) if where[j]]
    if bank is not None:
      b = unit(bank)
      valid = np.ones(b.shape[0], bool) if bank_where is None else np.asarray(bank_where, bool)
      scores += [a[i] @ b[m] / temperature for m in range(b.shape[0]) if valid[m]]
    scores = np.array(scores)
    top = scores.max()
    out[i] = top + np.log(np.exp(scores - top).sum()) - a[i] @ p[i] / temperature
  return out


def crd_loss(student, teacher, *, temperature=0.07, where=None, teacher_bank=None,
             student_bank=None, bank_where=None, symmetric=True) -> np.ndarray:
  """``l^{s->t} + l^{t->s}`` per anchor (``l^{s->t}`` alone when not symmetric)."""
  out = info_nce_one_side(student, teacher, temperature=temperature, where=where,
                          bank=teacher_bank, bank_where=bank_where)
  if symmetric:
    out = out + info_nce_one_side(teacher, student, temperature=temperature, where=where,
                                  bank=student_bank, bank_where=bank_where)
  return out


def pool(hidden, where=None, pooling="sequence"):
  """``(vectors [N, H], counted [N])``: per-sequence means over counted tokens, or tokens."""
  h = f64(hidden)
  b, t, d = h.shape
  where = np.ones((b, t), bool) if where is None else np.asarray(where, bool)
  if pooling == "token":
    return h.reshape(b * t, d), where.reshape(-1)
  out = np.zeros((b, d))
  for i in range(b):
    rows = [h[i, j] for j in range(t) if where[i, j]]
    if rows:
      out[i] = np.mean(rows, axis=0)
  return out, where.any(axis=1)


class RingBank:
  """A FIFO memory bank of ``size`` rows: the ``c``-th counted row ever pushed (0-based) goes to
  row ``c % size``, so the bank holds the last ``size`` counted rows."""

  def __init__(self, size: int, dim: int):
    self.size = size
    self.teacher = np.zeros((size, dim))
    self.student = np.zeros((size, dim))
    self.count = 0

  def push(self, teacher, student, where=None):
    teacher, student = unit(teacher), unit(student)
    where = np.ones(len(teacher), bool) if where is None else np.asarray(where, bool)
    for i in range(len(teacher)):
      if where[i]:
        self.teacher[self.count % self.size] = teacher[i]
        self.student[self.count % self.size] = student[i]
        self.count += 1

  @property
  def filled(self) -> int:
    return min(self.count, self.size)

  @property
  def position(self) -> int:
    return self.count % self.size

  def valid(self) -> np.ndarray:
    return np.arange(self.size) < self.filled
