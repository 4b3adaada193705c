r"""Contrastive representation distillation (CRD) for language models, and its objective term.

The student's and the teacher's final hidden states are pooled (one vector per sequence, or one
per token), projected by two trainable linear maps to a shared ``feature_dim`` and L2-normalised;
InfoNCE then asks each student embedding to pick its own teacher embedding out of the batch's
others (and, optionally, out of a memory bank of earlier steps' teacher embeddings), and, in the
symmetric form of the paper, each teacher embedding its own student embedding:

.. math::
   \ell^{s \to t}_i = -\log \frac{\exp(s_i \cdot t_i / \tau)}
       {\sum_{j \in B} \exp(s_i \cdot t_j / \tau) + \sum_{m \in M_t} \exp(s_i \cdot m / \tau)}

and ``l_i = l^{s->t}_i + l^{t->s}_i`` (the teacher-side anchors against the student embeddings
and the bank of student embeddings), averaged over the counted anchors.

The objective term ``crd`` (registered here in :data:`jkd.losses.LOSS_TERMS`) reads
``student_hidden`` ``[B, T, Hs]`` and ``teacher_hidden`` ``[B, T, Ht]``; its projections are
the term's own parameters (``objective.init_params``: trained with the student, checkpointed
with it); with ``memory_size > 0`` its state is the memory bank (:class:`CRDBank`), a FIFO of
the last ``memory_size`` embeddings of each side, filled after each step from the embeddings
the term hands to :meth:`jkd.losses.Objective.update_state`.

Reference: Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020
(arXiv:1910.10699).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jkd.losses import _common
from jkd.losses import tokens
from jkd.losses.objective import register_loss_term, token_mask

Array = jax.Array

#: ``pooling`` choices: one embedding per sequence (mean over its counted tokens, the paper's
#: per-sample unit) or one per counted token.
POOLINGS = ("sequence", "token")


def _check_embeddings(x: Any, name: str) -> Array:
  x = _common.check_float_array(x, name)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D] embeddings (got shape {x.shape}); pool and"
                     " flatten hidden states first (crd_pool).")
  return x


def _normalize(x: Array) -> Array:
  """``x / ||x||`` over the last axis, in float32 (at least); a zero row stays 0, NaN-free."""
  x = x.astype(_common.compute_dtype(x.dtype))
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _info_nce(anchors: Array, positives: Array, valid: Array, bank: Array | None,
              bank_valid: Array | None, temperature: float) -> Array:
  """``[N]`` InfoNCE of unit ``anchors`` against ``positives`` (in-batch) and ``bank``."""
  n = anchors.shape[0]
  logits = anchors @ positives.T / temperature
  eye = jnp.eye(n, dtype=jnp.bool_)
  # Column j is a candidate of anchor i when row j counts; the diagonal always is (an uncounted
  # anchor's row then has a finite logsumexp, which the caller zeroes).
  logits = jnp.where(valid[None, :] | eye, logits, -jnp.inf)
  if bank is not None:
    bank_logits = anchors @ jax.lax.stop_gradient(bank).T / temperature
    bank_logits = jnp.where(bank_valid[None, :], bank_logits, -jnp.inf)
    logits = jnp.concatenate([logits, bank_logits], axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits[:, :n])


def crd_loss(student_embed: Array, teacher_embed: Array, *, temperature: float = 0.07,
             where: Array | None = None, teacher_bank: Array | None = None,
             student_bank: Array | None = None, bank_where: Array | None = None,
             symmetric: bool = True) -> Array:
  r"""CRD's contrastive loss (InfoNCE) per anchor, against in-batch and memory-bank negatives.

  Both sides are L2-normalised here. With ``s_i``, ``t_i`` the unit embeddings of anchor ``i``,
  ``B`` the counted anchors and ``M_t``, ``M_s`` the valid bank rows:

  .. math::
     \ell^{s\to t}_i = \log\Big(\sum_{j\in B} e^{s_i\cdot t_j/\tau}
        + \sum_{m\in M_t} e^{s_i\cdot m/\tau}\Big) - s_i\cdot t_i/\tau,\qquad
     \ell_i = \ell^{s\to t}_i + \ell^{t\to s}_i

  ``l^{t->s}`` swaps the roles (teacher anchors, student embeddings and ``student_bank``); it
  is left out with ``symmetric=False``. Bank rows are constants (no gradient).

  Args:
    student_embed: ``[N, D]`` projected student embeddings (any float dtype; float32 compute).
    teacher_embed: ``[N, D]`` projected teacher embeddings, row ``i`` the positive of row ``i``.
    temperature: ``tau > 0`` (0.07 in the paper).
    where: optional boolean ``[N]``: the counted anchors; the others are neither anchors nor
      negatives and give 0 (and no gradient).
    teacher_bank: optional ``[M, D]`` earlier teacher embeddings, negatives of the student
      anchors; ``student_bank`` likewise for the teacher anchors (needed when symmetric).
    bank_where: optional boolean ``[M]``: the bank rows that hold an embedding.
    symmetric: add the teacher-anchored term (the paper's two-sided loss).

  Returns:
    ``[N]`` float32 losses, 0 where ``where`` is False.

  References: Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020;
  InfoNCE: van den Oord et al., 2018.

  >>> import jax.numpy as jnp
  >>> e = jnp.eye(3)  # three orthogonal pairs: each positive beats its negatives by 1 / tau
  >>> loss = crd_loss(e, e, temperature=1.0, symmetric=False)
  >>> bool(jnp.allclose(loss, jnp.log(jnp.e + 2.0) - 1.0))
  True
  """
  s = _check_embeddings(student_embed, "student_embed")
  t = _check_embeddings(teacher_embed, "teacher_embed")
  if s.shape != t.shape:
    raise ValueError(f"student_embed {s.shape} and teacher_embed {t.shape} must have the same"
                     " shape: project both sides to one feature dimension, one row per anchor.")
  temperature = _common.check_positive(temperature, "temperature")
  if not isinstance(symmetric, bool):
    raise TypeError(f"symmetric must be a bool (got {symmetric!r}).")
  where = _common.check_where(where, s.shape[:1])
  valid = jnp.ones(s.shape[:1], jnp.bool_) if where is None else where
  if symmetric and (teacher_bank is None) != (student_bank is None):
    raise ValueError("the symmetric loss needs both banks (teacher_bank for the student anchors,"
                     " student_bank for the teacher anchors), or neither; or symmetric=False.")
  banks = {}
  for name, bank in (("teacher_bank", teacher_bank), ("student_bank", student_bank)):
    banks[name] = None
    if bank is not None:
      bank = _check_embeddings(bank, name)
      if bank.shape[1] != s.shape[1]:
        raise ValueError(f"{name} has feature dimension {bank.shape[1]} but the embeddings"
                         f" {s.shape[1]}: the bank holds embeddings of the same projection.")
      banks[name] = _normalize(bank)
  sizes = {b.shape[0] for b in banks.values() if b is not None}
  if len(sizes) > 1:
    raise ValueError(f"teacher_bank and student_bank must have the same number of rows (got"
                     f" {sorted(sizes)}).")
  bank_valid = None
  if sizes:
    size = sizes.pop()
    bank_valid = (jnp.ones((size,), jnp.bool_) if bank_where is None
                  else _common.check_where(bank_where, (size,), "bank_where"))
  elif bank_where is not None:
    raise ValueError("bank_where is given but no bank: pass teacher_bank (and student_bank).")
  # Double where: uncounted rows (padding, empty sequences) are replaced by a fixed unit vector
  # before the normalisation, so that whatever they hold gives no NaN, nor NaN gradients.
  dtype = _common.compute_dtype(jnp.result_type(s, t))
  unit = jnp.full((s.shape[1],), s.shape[1] ** -0.5, dtype)
  s = _normalize(jnp.where(valid[:, None], s.astype(dtype), unit))
  t = _normalize(jnp.where(valid[:, None], t.astype(dtype), unit))
  values = _info_nce(s, t, valid, banks["teacher_bank"], bank_valid, temperature)
  if symmetric:
    values = values + _info_nce(t, s, valid, banks["student_bank"], bank_valid, temperature)
  return jnp.where(valid, values, 0.0)


def crd_pool(hidden: Array, *, where: Array | None = None, pooling: str = "sequence"
             ) -> tuple[Array, Array]:
  """Hidden states ``[B, T, H]`` to the anchors' vectors: ``(vectors [N, H], counted [N])``.

  ``pooling="sequence"``: ``N = B``, each sequence's mean over its counted tokens (``where``);
  a sequence without one is not counted. ``"token"``: ``N = B * T``, one per position, counted
  where ``where`` is True.

  >>> import jax.numpy as jnp
  >>> h = jnp.arange(12.0).reshape(1, 3, 4)
  >>> v, ok = crd_pool(h, where=jnp.array([[True, True, False]]))
  >>> v.tolist(), ok.tolist()
  ([[2.0, 3.0, 4.0, 5.0]], [True])
  """
  h = _common.check_float_array(hidden, "hidden")
  if h.ndim != 3:
    raise ValueError(f"hidden must be [batch, seq, hidden] (got shape {h.shape}).")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS} (got {pooling!r}).")
  where = _common.check_where(where, h.shape[:2])
  mask = jnp.ones(h.shape[:2], jnp.bool_) if where is None else where
  h = h.astype(_common.compute_dtype(h.dtype))
  if pooling == "token":
    return h.reshape(-1, h.shape[-1]), mask.reshape(-1)
  count = jnp.sum(mask, axis=1)
  total = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1)
  return total / jnp.maximum(count, 1)[:, None].astype(h.dtype), count > 0


def init_crd_projection(key: Array, in_dim: int, feature_dim: int) -> dict[str, Array]:
  """A linear map ``{"kernel": [in_dim, feature_dim], "bias": [feature_dim]}`` (LeCun normal,
  zero bias) from a model's hidden states to the shared embedding space.

  >>> import jax
  >>> p = init_crd_projection(jax.random.key(0), 6, 4)
  >>> p["kernel"].shape, p["bias"].shape
  ((6, 4), (4,))
  """
  for value, name in ((in_dim, "in_dim"), (feature_dim, "feature_dim")):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int (got {value!r}).")
  return {"kernel": jax.nn.initializers.lecun_normal()(key, (int(in_dim), int(feature_dim)),
                                                        jnp.float32),
          "bias": jnp.zeros((int(feature_dim),), jnp.float32)}


def crd_project(vectors: Array, projection: Mapping[str, Array]) -> Array:
  """``vectors [N, H] @ kernel + bias``, in float32 (the loss normalises the result)."""
  x = vectors.astype(_common.compute_dtype(vectors.dtype))
  kernel = jnp.asarray(projection["kernel"])
  if kernel.shape[0] != x.shape[-1]:
    raise ValueError(f"the projection takes width {kernel.shape[0]} but the hidden states have"
                     f" width {x.shape[-1]}: make the term's parameters from these models'"
                     " shapes (objective.init_params).")
  return x @ kernel.astype(x.dtype) + jnp.asarray(projection["bias"]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The memory bank.
# ----------------------------------------------------------------------------------------------

class CRDBank(NamedTuple):
  """CRD's memory bank: FIFO ring buffers of earlier steps' unit embeddings.

  Attributes:
    teacher: ``[M, D]`` teacher embeddings (negatives of the student anchors).
    student: ``[M, D]`` student embeddings (negatives of the teacher anchors).
    filled: int32 scalar: rows ``0 .. filled - 1`` hold an embedding.
    position: int32 scalar: the next row written (the oldest once the bank is full).
  """
  teacher: Array
  student: Array
  filled: Array
  position: Array


def crd_bank_init(*, size: int, feature_dim: int) -> CRDBank:
  """An empty bank of ``size`` rows of ``feature_dim``.

  >>> b = crd_bank_init(size=4, feature_dim=2)
  >>> b.teacher.shape, int(b.filled)
  ((4, 2), 0)
  """
  for value, name in ((size, "size"), (feature_dim, "feature_dim")):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int (got {value!r}).")
  zeros = jnp.zeros((int(size), int(feature_dim)), jnp.float32)
  return CRDBank(teacher=zeros, student=zeros, filled=jnp.zeros((), jnp.int32),
                 position=jnp.zeros((), jnp.int32))


def crd_bank_where(bank: CRDBank) -> Array:
  """``[M]`` bool: the rows that hold an embedding."""
  return jnp.arange(bank.teacher.shape[0]) < bank.filled


def crd_bank_push(bank: CRDBank, teacher: Array, student: Array, *,
                  where: Array | None = None) -> CRDBank:
  """Writes the counted rows of ``teacher``/``student`` ``[N, D]`` into the bank, FIFO.

  Counted rows (``where``) are written in order at ``position, position + 1, ...`` (modulo the
  size), overwriting the oldest once the bank is full; of more counted rows than the bank holds,
  the last ``M`` are kept. Rows are L2-normalised and detached.

  >>> import jax.numpy as jnp
  >>> b = crd_bank_init(size=3, feature_dim=1)
  >>> b = crd_bank_push(b, jnp.ones((2, 1)), jnp.ones((2, 1)))
  >>> b = crd_bank_push(b, -jnp.ones((2, 1)), -jnp.ones((2, 1)))
  >>> b.teacher[:, 0].tolist(), int(b.filled), int(b.position)
  ([-1.0, 1.0, -1.0], 3, 1)
  """
  size = bank.teacher.shape[0]
  teacher = _normalize(jax.lax.stop_gradient(jnp.asarray(teacher)))
  student = _normalize(jax.lax.stop_gradient(jnp.asarray(student)))
  if teacher.shape != student.shape or teacher.shape[1:] != bank.teacher.shape[1:]:
    raise ValueError(f"teacher {teacher.shape} and student {student.shape} must both be"
                     f" [N, {bank.teacher.shape[1]}] (the bank's feature dimension).")
  n = teacher.shape[0]
  valid = jnp.ones((n,), jnp.bool_) if where is None else jnp.asarray(where) > 0
  rank = jnp.cumsum(valid.astype(jnp.int32)) - 1  # index of each counted row among them
  count = jnp.sum(valid.astype(jnp.int32))
  keep = valid & (rank >= count - size)
  dest = jnp.where(keep, (bank.position + rank) % size, size)  # size: out of range, dropped
  return CRDBank(
      teacher=bank.teacher.at[dest].set(teacher.astype(bank.teacher.dtype), mode="drop"),
      student=bank.student.at[dest].set(student.astype(bank.student.dtype), mode="drop"),
      filled=jnp.minimum(bank.filled + count, size).astype(jnp.int32),
      position=((bank.position + count) % size).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------
# The objective term.
# ----------------------------------------------------------------------------------------------

_NEEDS = (("student_hidden", "teacher_hidden"),)


def _crd_validate(*, feature_dim: int = 128, temperature: float = 0.07,
                  pooling: str = "sequence", memory_size: int = 0, symmetric: bool = True):
  for value, name, low in ((feature_dim, "feature_dim", 1), (memory_size, "memory_size", 0)):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an int >= {low} (got {value!r}).")
  _common.check_positive(temperature, "temperature")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS} (got {pooling!r}).")
  if not isinstance(symmetric, bool):
    raise ValueError(f"symmetric must be True or False (got {symmetric!r}).")


def _crd_params(key, inputs, *, feature_dim: int = 128, **_):
  """The two projections ``{"student": ..., "teacher": ...}`` from the hidden states' widths."""
  if inputs.get("student_hidden") is None or inputs.get("teacher_hidden") is None:
    return None
  ks, kt = jax.random.split(key)
  return {"student": init_crd_projection(ks, inputs["student_hidden"].shape[-1], feature_dim),
          "teacher": init_crd_projection(kt, inputs["teacher_hidden"].shape[-1], feature_dim)}


def _crd_init(*, feature_dim: int = 128, memory_size: int = 0, **_):
  return crd_bank_init(size=memory_size, feature_dim=feature_dim) if memory_size else None


def _crd_update(state, value, step, *, state_inputs=None, **_):
  del value, step
  if state_inputs is None:
    raise ValueError("crd: the memory bank is filled from the embeddings of the step: pass the"
                     " metrics that objective(...) returned to objective.update_state.")
  return crd_bank_push(state, state_inputs["teacher"], state_inputs["student"],
                       where=state_inputs["where"])


def _crd_state_metrics(state):
  return {"bank_filled": state.filled.astype(jnp.float32)}


@register_loss_term("crd", needs=_NEEDS, init_params=_crd_params, init_state=_crd_init,
                    update_state=_crd_update, validate=_crd_validate,
                    state_metrics=_crd_state_metrics)
def _crd_term(inputs, *, params=None, state=None, feature_dim: int = 128,
              temperature: float = 0.07, pooling: str = "sequence", memory_size: int = 0,
              symmetric: bool = True):
  """CRD between the final hidden states, through the term's projections (``params``)."""
  del feature_dim
  if inputs.get("student_hidden") is None or inputs.get("teacher_hidden") is None:
    present = sorted(k for k, v in inputs.items() if v is not None)
    raise ValueError(f"loss term 'crd' needs the inputs (student_hidden, teacher_hidden); the"
                     f" batch has {present}.")
  if params is None:
    raise ValueError("crd: no projections: make the term's parameters with"
                     " objective.init_params(key, inputs) (the engine does) and pass them as"
                     " objective(inputs, state, params).")
  mask = token_mask(inputs)
  s, counted = crd_pool(inputs["student_hidden"], where=mask, pooling=pooling)
  t, _ = crd_pool(jax.lax.stop_gradient(inputs["teacher_hidden"]), where=mask, pooling=pooling)
  zs, zt = crd_project(s, params["student"]), crd_project(t, params["teacher"])
  bank = {}
  if memory_size:
    bank = dict(teacher_bank=state.teacher, student_bank=state.student,
                bank_where=crd_bank_where(state))
  values = crd_loss(zs, zt, temperature=temperature, where=counted, symmetric=symmetric, **bank)
  loss = tokens.masked_mean(values, counted)
  if not memory_size:
    return loss
  return loss, {}, {"teacher": _normalize(zt), "student": _normalize(zs),
                    "where": counted.astype(jnp.float32)}
