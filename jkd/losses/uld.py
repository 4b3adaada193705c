"""Cross-tokenizer distillation: Universal Logit Distillation (ULD) and token alignment.

When teacher and student tokenize text differently, their vocabularies (and sequence lengths)
differ and no token-level divergence applies. ULD (Boizard et al., 2024) compares the two
distributions without a vocabulary map: at aligned positions, the L1 distance between the
*sorted* probability vectors (a closed form of the Wasserstein-1 distance when every token is
one unit apart from every other). Positions are aligned through the text: a student position and
a teacher position align when their tokens end at the same character of the same text, so both
models have read exactly the same prefix.

The tokenizer side (offsets, padding, the batch arrays) is
:func:`jkd.data.tokenizers.cross_tokenize`; this module holds the pure math: :func:`uld_loss`,
:func:`align_by_offsets` and :func:`gather_aligned_logits`. The objective term ``uld`` of
:func:`jkd.losses.build_objective` gathers the teacher's logits at ``teacher_index`` and takes
the masked token mean; add ``cross_entropy`` on the student's own labels beside it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd.losses import _common

Array = jax.Array


def _sorted_probs(logits: Array, temperature: float, top_k: int | None) -> Array:
  """``softmax(z / T)`` sorted in decreasing order (only the ``top_k`` largest if given)."""
  p = jnp.exp(_common.log_softmax_t(logits, temperature))
  if top_k is not None:
    return jax.lax.top_k(p, min(top_k, p.shape[-1]))[0]
  return -jnp.sort(-p, axis=-1)


def uld_loss(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
             where: Array | None = None, top_k: int | None = None) -> Array:
  r"""Universal Logit Distillation: L1 distance of sorted probability vectors, per position.

  With ``q = softmax(zs / T)`` over the student's ``V_s`` tokens and ``p = softmax(zt / T)``
  over the teacher's ``V_t`` tokens, both sorted in decreasing order and the shorter padded
  with zeros to ``max(V_s, V_t)`` entries:

  .. math:: T^2 \sum_i \left| \mathrm{sort}(q)_i - \mathrm{sort}(p)_i \right|

  The vocabularies may differ in size and content; the positions must already be aligned (see
  :func:`align_by_offsets` and :func:`gather_aligned_logits`). As every jkd distance it is
  multiplied by ``T**2`` (Hinton's convention; at the default ``T = 1`` it is exactly the
  paper's). The cross-entropy on the student's own labels is a separate term, added by the
  caller. Zero when the sorted vectors agree, never negative, at most ``2 T**2``.

  Args:
    student_logits: ``[..., V_s]`` student logits (any float dtype; float32 compute).
    teacher_logits: ``[..., V_t]`` teacher logits at the same positions.
    temperature: softmax temperature ``T > 0`` of both.
    where: optional boolean ``[...]`` mask of the positions that count.
    top_k: compare only the ``k`` largest probabilities of each (a common speed-up: a full sort
      of a large vocabulary per position is costly); ``None`` compares everything.

  Returns:
    ``[...]`` float32 per-position distances, zero where ``where`` is False.

  References: Boizard et al., *Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs*, 2024.

  >>> import jax.numpy as jnp
  >>> zs = jnp.log(jnp.array([[0.2, 0.7, 0.1]]))          # student, 3 tokens
  >>> zt = jnp.log(jnp.array([[0.1, 0.1, 0.7, 0.1]]))     # teacher, 4 tokens
  >>> [round(float(v), 4) for v in uld_loss(zs, zt)]       # |.7-.7|+|.2-.1|+|.1-.1|+|0-.1|
  [0.2]
  """
  zs = _common.check_float_array(student_logits, "student_logits")
  zt = _common.check_float_array(teacher_logits, "teacher_logits")
  if zs.ndim == 0 or zt.ndim == 0:
    raise ValueError("student_logits and teacher_logits need a vocabulary axis: [..., vocab].")
  if zs.shape[:-1] != zt.shape[:-1]:
    raise ValueError(
        f"student_logits positions {zs.shape[:-1]} != teacher_logits positions"
        f" {zt.shape[:-1]}: ULD compares aligned positions. Gather the teacher's logits at the"
        " aligned positions first (gather_aligned_logits with a teacher_index from"
        " jkd.data.cross_tokenize).")
  temperature = _common.check_temperature(temperature)
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                            or top_k <= 0):
    raise ValueError(f"top_k must be a positive int or None (got {top_k!r}).")
  where = _common.check_where(where, zs.shape[:-1])
  zs, zt = _common.mask_rows(zs, where), _common.mask_rows(zt, where)
  qs = _sorted_probs(zs, temperature, top_k)
  pt = _sorted_probs(zt, temperature, top_k)
  n = max(qs.shape[-1], pt.shape[-1])
  pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])  # noqa: E731
  values = jnp.sum(jnp.abs(pad(qs) - pad(pt).astype(qs.dtype)), axis=-1) * temperature ** 2
  return _common.apply_where(values, where)


def align_by_offsets(teacher_offsets: Sequence[Sequence[int]] | np.ndarray,
                     student_offsets: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
  """For each student token, the teacher token that ends at the same character of the text.

  Both offset lists come from tokenizing the SAME text (``offset_mapping`` of a Hugging Face
  fast tokenizer: ``(start, end)`` character span per token). At a student position ``i`` whose
  token ends at character ``c``, the student has read ``text[:c]``; the teacher position whose
  token also ends at ``c`` has read the same prefix, so their next-token distributions are
  compared by ULD.

  Rules: tokens with an empty span (special tokens such as BOS/EOS, ``start == end``) are never
  aligned; when several tokens end at the same character (byte-level BPE splits one character
  into several byte tokens, each given that character's span), only the last of them has read
  the whole character: on the teacher side it is the one chosen, on the student side only it is
  aligned.

  Args:
    teacher_offsets: ``[N_t, 2]`` ``(start, end)`` character offsets of the teacher's tokens.
    student_offsets: ``[N_s, 2]`` offsets of the student's tokens.

  Returns:
    ``[N_s]`` int32: the aligned teacher position, or ``-1`` where no teacher token ends there.

  >>> # "ab cd": teacher tokens "ab", " cd"; student tokens "a", "b", " c", "d"
  >>> align_by_offsets([(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 4), (4, 5)]).tolist()
  [-1, 0, -1, 1]
  """
  t = _offsets_array(teacher_offsets, "teacher_offsets")
  s = _offsets_array(student_offsets, "student_offsets")
  ends: dict[int, int] = {}
  for j, (start, end) in enumerate(t.tolist()):
    if end > start:
      ends[end] = j  # the last teacher token ending here wins
  out = np.full(len(s), -1, np.int32)
  spans = s.tolist()
  for i, (start, end) in enumerate(spans):
    if end <= start:
      continue
    if i + 1 < len(spans) and spans[i + 1][1] == end and spans[i + 1][1] > spans[i + 1][0]:
      continue  # a later student token ends at the same character: only the last is aligned
    out[i] = ends.get(end, -1)
  return out


def _offsets_array(offsets: Any, name: str) -> np.ndarray:
  arr = np.asarray(offsets, dtype=np.int64)
  if arr.size == 0:
    return arr.reshape(0, 2)
  if arr.ndim != 2 or arr.shape[1] != 2:
    raise ValueError(f"{name} must be a list of (start, end) character offsets, shape [n, 2];"
                     f" got shape {arr.shape}. Tokenize with return_offsets_mapping=True.")
  if (arr < 0).any() or (arr[:, 1] < arr[:, 0]).any():
    bad = int(np.flatnonzero((arr < 0).any(1) | (arr[:, 1] < arr[:, 0]))[0])
    raise ValueError(f"{name}[{bad}] = {tuple(arr[bad].tolist())} is not a character span"
                     " (0 <= start <= end).")
  return arr


def gather_aligned_logits(teacher_logits: Array, teacher_index: Array
                          ) -> tuple[Array, Array]:
  """The teacher's logits at the positions aligned to each student position.

  Args:
    teacher_logits: ``[B, T_t, V_t]`` logits of the teacher over its own tokens.
    teacher_index: ``[B, T]`` int teacher position per student position, ``-1`` = unaligned
      (as made by :func:`jkd.data.cross_tokenize`).

  Returns:
    ``(logits, aligned)``: ``[B, T, V_t]`` gathered logits (position 0's where unaligned) and the
    ``[B, T]`` boolean mask of the aligned positions (AND it into the loss mask).

  >>> import jax.numpy as jnp
  >>> zt = jnp.arange(6.0).reshape(1, 3, 2)
  >>> z, ok = gather_aligned_logits(zt, jnp.array([[2, -1]]))
  >>> z.tolist(), ok.tolist()
  ([[[4.0, 5.0], [0.0, 1.0]]], [[True, False]])
  """
  zt = _common.check_float_array(teacher_logits, "teacher_logits")
  index = jnp.asarray(teacher_index)
  if not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(f"teacher_index must be integer positions (got dtype {index.dtype}).")
  if zt.ndim != 3 or index.ndim != 2 or index.shape[0] != zt.shape[0]:
    raise ValueError(f"teacher_logits must be [B, T_t, V_t] and teacher_index [B, T] with the"
                     f" same B; got {zt.shape} and {index.shape}.")
  aligned = (index >= 0) & (index < zt.shape[1])
  safe = jnp.where(aligned, index, 0).astype(jnp.int32)
  return jnp.take_along_axis(zt, safe[..., None], axis=1), aligned
