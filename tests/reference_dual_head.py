"""Float64 NumPy references for dual-head distillation (docs/methods.md §14), written from the
formulas, independently of ``jkd.losses.dual_head``: no JAX.

``h`` ``[..., H]`` final hidden states, ``W`` ``[H, V]`` the main head, ``A`` ``[H, V]`` the
auxiliary head (``W + Delta`` for ``head="delta"``, ``Delta`` itself for ``head="separate"``).
"""

from __future__ import annotations

import numpy as np

import reference as ref


def aux_head(main_head, own, head: str = "delta") -> np.ndarray:
  """``A = W + Delta`` (delta) or ``A = Delta`` (separate). The stop-gradient on ``W`` is not a
  value: it only says which gradient the library must report (zero for ``W``)."""
  own = ref.f64(own)
  return ref.f64(main_head) + own if head == "delta" else own


def kd_loss(hidden, main_head, own, *, head: str = "delta", divergence: str = "forward_kl",
            temperature: float = 1.0, teacher_logits=None, teacher_ids=None,
            teacher_logprobs=None, tail: bool = True, labels=None, where=None,
            **options) -> float:
  """The masked token mean of ``T^2 D(aux head's distribution, teacher's)``, the aux logits
  being ``h A``; a full teacher (``teacher_logits``) or a sparse one (ids + log-probs)."""
  zs = ref.f64(hidden) @ aux_head(main_head, own, head)
  mask = np.ones(zs.shape[:-1], bool)
  if labels is not None:
    mask &= np.asarray(labels) != ref.IGNORE_INDEX
  if where is not None:
    mask &= np.asarray(where, bool)
  if teacher_logits is not None:
    values = ref.full_divergence(divergence, zs, teacher_logits, temperature=temperature,
                                 **options)
  else:
    values = ref.sparse_divergence(divergence, zs, teacher_ids, teacher_logprobs, tail=tail,
                                   temperature=temperature, **options)
  return ref.masked_mean(values, mask)


def mixture_logprobs(hidden, main_head, aux, *, alpha: float, beta: float) -> np.ndarray:
  """``log(alpha softmax(h W) + (1 - alpha) softmax(h A / beta))``."""
  h = ref.f64(hidden)
  p = alpha * ref.softmax(h @ ref.f64(main_head)) + (1 - alpha) * ref.softmax(
      h @ ref.f64(aux) / beta)
  with np.errstate(divide="ignore"):
    return np.log(p)


def merged_logprobs(hidden, main_head, aux, *, alpha: float, beta: float) -> np.ndarray:
  """The logit-level merge: ``log_softmax(h (alpha W + (1 - alpha) A / beta))``."""
  merged = alpha * ref.f64(main_head) + (1 - alpha) * ref.f64(aux) / beta
  return ref.log_softmax(ref.f64(hidden) @ merged)


def log_overlap(hidden, main_head, aux, *, alpha: float, beta: float) -> np.ndarray:
  """``log Z``, ``Z = sum_v p_W^alpha p_A'^(1 - alpha)`` (``p_A' = softmax(h A / beta)``): the
  normaliser of the geometric mixture, ``<= 1`` by Hoelder."""
  h = ref.f64(hidden)
  log_pw = ref.log_softmax(h @ ref.f64(main_head))
  log_pa = ref.log_softmax(h @ ref.f64(aux) / beta)
  return ref.logsumexp(alpha * log_pw + (1 - alpha) * log_pa)
