"""Memory-bounded ("fused linear") losses: hidden states and output heads in, no full logits.

Materialising ``[tokens, vocab]`` logits of both models dominates the memory of a KD step
(vocab is 49k to 152k). These functions take the final hidden states ``[N, H]`` and output-head
weights ``[H, V]`` and walk the tokens in chunks: per chunk they form the logits, the loss and,
when differentiated, the gradients with respect to the student's hidden states and head, so that
no more than ``chunk_size x V`` logits exist at once, forward and backward. The gradients are
computed during the forward sweep (one matmul pass, as in Liger-Kernel) and scaled by the
incoming cotangent in the backward pass.

Because the gradients are formed in the forward sweep, these functions return the *reduced*
loss ``sum_i weights_i * loss_i`` (by default the masked token mean), plus the per-token values
as a detached array for metrics. The teacher's inputs are constants (no gradient flows into
them), as in every distillation recipe. Values and student gradients equal the unfused form.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jkd import partitioning
from jkd import precision
from jkd.losses import _common
from jkd.losses import divergences
from jkd.losses import sparse
from jkd.losses import tokens

Array = jax.Array
PyTree = Any

#: Default number of tokens per chunk: ``chunk_size x vocab`` float32 logits per live array.
DEFAULT_CHUNK_SIZE = 512

#: Default number of vocabulary columns per block of the head-gradient sweep
#: (:func:`blocked_linear_loss`).
DEFAULT_VOCAB_BLOCK = 1024


def _matmul(hidden: Array, head: Array) -> Array:
  """float32 logits; operands in the hidden states' dtype (bf16 ones accumulate in float32)."""
  return precision.dot(hidden, head, dtype=hidden.dtype, out_dtype=jnp.float32)


def _chunking(n: int, chunk_size: int) -> tuple[Callable, Callable]:
  """``(chunked, unchunked)``: ``[n, ...]`` arrays to ``[n_chunks, size, ...]`` and back, chunk
  ``c`` holding tokens ``c, c + n_chunks, ...`` (see :func:`_sweep`)."""
  shards = partitioning.batch_shards()
  n_chunks = max(-(-n // (chunk_size * shards)), 1)
  size = -(-n // n_chunks)
  size = -(-size // shards) * shards if n % shards == 0 else size
  pad = n_chunks * size - n

  def chunked(x):
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
    x = x.reshape((size, n_chunks) + x.shape[1:]).swapaxes(0, 1)
    return partitioning.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  def unchunked(x):
    return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])[:n]

  return chunked, unchunked


def _sweep(token_fn: Callable, hidden: Array, head: Array, token_inputs: PyTree,
           shared: PyTree, weights: Array, chunk_size: int, with_grads: bool):
  """Walks the ``[N, H]`` hidden states in chunks. Returns (loss, values, grads or None).

  Chunk ``c`` holds tokens ``c, c + n_chunks, c + 2 n_chunks, ...``: when the tokens are
  sharded over devices (rows of a batch-sharded ``[B, T, H]``, flattened), every chunk takes
  ``chunk_size`` tokens from each device's own rows, so the scan never crosses a sharded axis
  and the batch stays sharded (:func:`jkd.partitioning.batch_shards`; one device outside the
  engine's steps).
  """
  n = hidden.shape[0]
  chunked, unchunked = _chunking(n, chunk_size)

  xs = (chunked(hidden), jax.tree.map(chunked, token_inputs), chunked(weights))

  def body(grad_head, chunk):
    h, tok, w = chunk
    if not with_grads:
      return grad_head, (token_fn(_matmul(h, head), tok, shared), None)
    logits, matmul_vjp = jax.vjp(_matmul, h, head)
    values, loss_vjp = jax.vjp(lambda z: token_fn(z, tok, shared), logits)
    (grad_logits,) = loss_vjp(w.astype(values.dtype))
    grad_h, grad_w = matmul_vjp(grad_logits)
    return grad_head + grad_w.astype(jnp.float32), (values, grad_h)

  init = jnp.zeros(head.shape, jnp.float32) if with_grads else None
  grad_head, (values, grad_hidden) = jax.lax.scan(body, init, xs)
  values = unchunked(values)
  loss = jnp.sum(values * weights)
  if not with_grads:
    return loss, values, None
  grad_hidden = unchunked(grad_hidden)
  return loss, values, (grad_hidden, grad_head.astype(head.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6))
def _fused(token_fn, hidden, head, token_inputs, shared, weights, chunk_size):
  loss, values, _ = _sweep(token_fn, hidden, head, token_inputs, shared, weights, chunk_size,
                           with_grads=False)
  return loss, values


def _fused_fwd(token_fn, hidden, head, token_inputs, shared, weights, chunk_size):
  loss, values, grads = _sweep(token_fn, hidden, head, token_inputs, shared, weights,
                               chunk_size, with_grads=True)
  return (loss, values), (grads, values)


def _fused_bwd(token_fn, chunk_size, residuals, cotangents):
  del token_fn, chunk_size
  (grad_hidden, grad_head), values = residuals
  g_loss, _ = cotangents  # The per-token values are returned detached (see module docstring).
  return (g_loss * grad_hidden.astype(jnp.float32)).astype(grad_hidden.dtype), \
         (g_loss * grad_head.astype(jnp.float32)).astype(grad_head.dtype), \
         None, None, g_loss * values


_fused.defvjp(_fused_fwd, _fused_bwd)


def _prepare(hidden, head, token_inputs, shared, chunk_size):
  """Validates the chunked functions' inputs; the per-token inputs and shared arrays are constants."""
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int (got {chunk_size!r}).")
  hidden = _common.check_float_array(hidden, "hidden")
  head = _common.check_float_array(head, "head")
  if hidden.ndim != 2 or head.ndim != 2 or hidden.shape[1] != head.shape[0]:
    raise ValueError(f"hidden {hidden.shape} and head {head.shape} must be [N, H] and [H, V].")
  return (hidden, head, jax.tree.map(jax.lax.stop_gradient, token_inputs),
          jax.tree.map(jax.lax.stop_gradient, shared), min(chunk_size, max(hidden.shape[0], 1)))


def chunked_linear_loss(token_fn: Callable[[Array, PyTree, PyTree], Array], hidden: Array,
                        head: Array, token_inputs: PyTree, *, shared: PyTree = None,
                        weights: Array, chunk_size: int = DEFAULT_CHUNK_SIZE
                        ) -> tuple[Array, Array]:
  """The building block: ``sum_i weights_i * token_fn(hidden_i @ head, inputs_i, shared)``.

  Args:
    token_fn: ``(logits [c, V] float32, token_inputs chunk, shared) -> [c]`` per-token losses;
      a fixed (non-closure over traced values) function.
    hidden: ``[N, H]`` hidden states (differentiable).
    head: ``[H, V]`` output-head weights (differentiable).
    token_inputs: pytree of ``[N, ...]`` arrays cut into chunks with ``hidden`` (constants).
    shared: pytree of arrays every chunk sees, e.g. the teacher's head (constants).
    weights: ``[N]`` per-token weights of the sum (differentiable).
    chunk_size: tokens per chunk.

  Returns:
    ``(loss, values)``: the weighted sum and the detached per-token values ``[N]``.
  """
  hidden, head, token_inputs, shared, chunk_size = _prepare(hidden, head, token_inputs, shared,
                                                              chunk_size)
  loss, values = _fused(token_fn, hidden, head, token_inputs, shared,
                        jnp.asarray(weights, jnp.float32), chunk_size)
  return loss, jax.lax.stop_gradient(values)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _token_values(token_fn, hidden, head, token_inputs, shared, chunk_size):
  n = hidden.shape[0]
  return _sweep(token_fn, hidden, head, token_inputs, shared, jnp.zeros((n,), jnp.float32),
                chunk_size, with_grads=False)[1]


def _token_values_fwd(token_fn, hidden, head, token_inputs, shared, chunk_size):
  values = _token_values(token_fn, hidden, head, token_inputs, shared, chunk_size)
  return values, (hidden, head, token_inputs, shared)


def _token_values_bwd(token_fn, chunk_size, residuals, g):
  hidden, head, token_inputs, shared = residuals
  # The cotangent of each token's value is its weight: one more sweep, recomputing the logits.
  _, _, (grad_hidden, grad_head) = _sweep(token_fn, hidden, head, token_inputs, shared,
                                          g.astype(jnp.float32), chunk_size, with_grads=True)
  return grad_hidden, grad_head, None, None


_token_values.defvjp(_token_values_fwd, _token_values_bwd)


def chunked_token_values(token_fn: Callable[[Array, PyTree, PyTree], Array], hidden: Array,
                         head: Array, token_inputs: PyTree, *, shared: PyTree = None,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> Array:
  """Per-token values ``token_fn(hidden_i @ head, inputs_i, shared)``, differentiable, chunked.

  Unlike :func:`chunked_linear_loss`, the output is the unreduced ``[N]`` array, for losses that
  are non-linear in per-token values (e.g. DPO on per-sequence log-probs). The backward pass
  recomputes each chunk's logits with the incoming per-token cotangents as weights, so memory
  stays ``O(chunk_size x V)`` at the price of one more head matmul per chunk.

  >>> import jax.numpy as jnp
  >>> fn = lambda z, tok, shared: jax.nn.logsumexp(z, axis=-1)
  >>> chunked_token_values(fn, jnp.ones((5, 2)), jnp.zeros((2, 3)), None, chunk_size=2).shape
  (5,)
  """
  hidden, head, token_inputs, shared, chunk_size = _prepare(hidden, head, token_inputs, shared,
                                                              chunk_size)
  return _token_values(token_fn, hidden, head, token_inputs, shared, chunk_size)


def _flatten(hidden: Array, head: Array, where: Any, weights: Any, name: str):
  """Validates shapes, flattens leading axes and builds the weights (masked mean default)."""
  hidden = _common.check_float_array(hidden, f"{name}hidden")
  head = _common.check_float_array(head, f"{name}head")
  if head.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != head.shape[0]:
    raise ValueError(
        f"{name}hidden {hidden.shape} and {name}head {head.shape} must be [..., H] and [H, V]"
        " with the same H (pass the output-embedding matrix transposed for tied embeddings).")
  lead = hidden.shape[:-1]
  where = _common.check_where(where, lead)
  mask = jnp.ones(lead, jnp.bool_) if where is None else where
  if weights is None:
    weights = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
  else:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != lead:
      raise ValueError(f"weights shape {weights.shape} must be the positions' shape {lead}.")
    weights = jnp.where(mask, weights, 0.0)
  return hidden.reshape(-1, hidden.shape[-1]), head, mask.reshape(-1), weights.reshape(-1), lead


def _divergence_fn(divergence, static_options, temperature, logits, tok, shared):
  teacher_logits = _matmul(tok["teacher_hidden"], shared["teacher_head"])
  values = divergences.divergence_values(
      divergence, _common.mask_rows(logits, tok["where"]),
      _common.mask_rows(teacher_logits, tok["where"]), temperature=temperature,
      options={**static_options, **shared["options"]})
  return jnp.where(tok["where"], values, 0.0)


def _split_options(core, options):
  static = {k: v for k, v in options.items() if isinstance(v, (int, float))}
  arrays = {k: v for k, v in options.items() if k not in static}
  return static, arrays


def fused_linear_divergence(student_hidden: Array, student_head: Array, teacher_hidden: Array,
                            teacher_head: Array, *, divergence: str = "forward_kl",
                            temperature: float = 1.0, where: Array | None = None,
                            weights: Array | None = None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE,
                            vocab_block: int | None = DEFAULT_VOCAB_BLOCK,
                            **options: Any) -> tuple[Array, Array]:
  r"""A token-level divergence from hidden states and heads, chunked over tokens.

  Computes ``sum_i w_i D(softmax(h_s,i W_s / T), softmax(h_t,i W_t / T)) * T**2`` where ``D``
  is the named divergence, without materialising more than ``chunk_size x V`` logits.

  Args:
    student_hidden: ``[..., Hs]`` final hidden states of the student (after the final norm).
    student_head: ``[Hs, V]`` student output head (``embedding.T`` when tied).
    teacher_hidden: ``[..., Ht]`` teacher final hidden states (constant).
    teacher_head: ``[Ht, V]`` teacher output head (constant).
    divergence: a name from :data:`jkd.losses.divergences.CORES` (``forward_kl``,
      ``generalized_jsd``, ...).
    temperature: ``T > 0``.
    where: optional boolean ``[...]`` of the counted positions.
    weights: optional ``[...]`` per-position weights; default: the masked token mean
      (``where / count``). Per-sequence means are ``where / length / batch``.
    chunk_size: tokens per chunk (memory ~ ``chunk_size x V`` floats per live array).
    vocab_block: for ``forward_kl``, ``reverse_kl`` and ``generalized_jsd`` (static options),
      the backward pass walks the vocabulary in blocks of this many columns and forms each
      block's head gradient whole (no ``[H, V]`` float32 accumulator: see
      :func:`blocked_linear_loss`); ``None`` accumulates it over token chunks instead.
    **options: the divergence's options (``beta``, ``alpha``, ``mu``, ``t``).

  Returns:
    ``(loss, per_token)``: the scalar weighted loss (differentiable in the student's hidden
    states and head, and in ``weights``), and the detached per-position values ``[...]``.

  References: Liger-Kernel's fused linear JSD (chunked); docs/methods.md §4 (fused losses).

  >>> import jax, jax.numpy as jnp
  >>> h = jax.random.normal(jax.random.key(0), (6, 4)); w = jnp.ones((4, 10))
  >>> loss, per_token = fused_linear_divergence(h, w, h, w, chunk_size=4)
  >>> float(loss), per_token.shape
  (0.0, (6,))
  """
  core, options = divergences.resolve_core(divergence, options)
  temperature = _common.check_temperature(temperature)
  hs, ws, mask, w, lead = _flatten(student_hidden, student_head, where, weights, "student_")
  teacher_hidden = _common.check_float_array(teacher_hidden, "teacher_hidden")
  teacher_head = _common.check_float_array(teacher_head, "teacher_head")
  if teacher_hidden.shape[:-1] != lead:
    raise ValueError(f"teacher_hidden positions {teacher_hidden.shape[:-1]} != student's {lead}.")
  if teacher_head.ndim != 2 or teacher_head.shape[0] != teacher_hidden.shape[-1]:
    raise ValueError(f"teacher_head {teacher_head.shape} must be [{teacher_hidden.shape[-1]}, V].")
  if teacher_head.shape[1] != ws.shape[1]:
    raise ValueError(
        f"teacher vocab {teacher_head.shape[1]} != student vocab {ws.shape[1]}: the models must"
        " share a tokenizer for token-level distillation.")
  static, arrays = _split_options(core, options)
  kind = divergence
  if divergence == "generalized_jsd" and "beta" in static:
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(float(static["beta"]), kind)
  if vocab_block is not None and kind in BLOCKED and not arrays:
    loss, values = blocked_linear_loss(
        kind, hs, ws, teacher_hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
        teacher_head=teacher_head, weights=w, temperature=temperature,
        beta=float(static.get("beta", 0.5)), chunk_size=chunk_size, vocab_block=vocab_block)
    return loss, jnp.where(mask, values, 0.0).reshape(lead)
  fn = functools.partial(_divergence_fn, divergence, static, temperature)
  token_inputs = {"teacher_hidden": teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                  "where": mask}
  shared = {"teacher_head": teacher_head, "options": arrays}
  loss, values = chunked_linear_loss(fn, hs, ws, token_inputs, shared=shared, weights=w,
                                     chunk_size=chunk_size)
  return loss, values.reshape(lead)


def _sparse_fn(core, static_options, temperature, tail, logits, tok, shared):
  masked = sparse._mask_inputs(tok["where"], logits, tok["teacher_ids"],
                               tok["teacher_logprobs"], tok.get("teacher_tail_logprob"))
  student, teacher = sparse.sparse_bins(*masked[:3], tail=tail, teacher_tail_logprob=masked[3],
                                        temperature=temperature)
  values = core(student, teacher, **static_options, **shared["options"]) * temperature ** 2
  return jnp.where(tok["where"], values, 0.0)


def fused_linear_sparse_divergence(student_hidden: Array, student_head: Array,
                                   teacher_ids: Array, teacher_logprobs: Array, *,
                                   divergence: str = "forward_kl", tail: bool = True,
                                   teacher_tail_logprob: Array | None = None,
                                   temperature: float = 1.0, where: Array | None = None,
                                   weights: Array | None = None,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE,
                                   **options: Any) -> tuple[Array, Array]:
  """:func:`jkd.losses.sparse_divergence` from the student's hidden states and head, chunked.

  The offline-cache form: the teacher is its stored top-k ids and log-probs ``[..., k]``.
  Arguments and returns as :func:`fused_linear_divergence` and
  :func:`jkd.losses.sparse_divergence`.

  >>> import jax, jax.numpy as jnp
  >>> h = jnp.ones((3, 4)); w = jnp.zeros((4, 5))
  >>> ids = jnp.tile(jnp.arange(5), (3, 1)); lp = jnp.full((3, 5), -jnp.log(5.0))
  >>> round(float(fused_linear_sparse_divergence(h, w, ids, lp)[0]), 6)
  0.0
  """
  core, options = divergences.resolve_core(divergence, options)
  temperature = _common.check_temperature(temperature)
  hs, ws, mask, w, lead = _flatten(student_hidden, student_head, where, weights, "student_")
  # Validate the sparse inputs once, on a zero-cost abstract evaluation of the bins.
  jax.eval_shape(lambda i, l: sparse.sparse_bins(jnp.zeros(lead + (ws.shape[1],)), i, l,
                                                 tail=tail, temperature=temperature),
                 teacher_ids, teacher_logprobs)
  _common.check_ids(teacher_ids, ws.shape[1], "teacher_ids")
  k = jnp.shape(teacher_ids)[-1]
  token_inputs = {"teacher_ids": jnp.asarray(teacher_ids).reshape(-1, k).astype(jnp.int32),
                  "teacher_logprobs": jnp.asarray(teacher_logprobs).reshape(-1, k),
                  "where": mask}
  if teacher_tail_logprob is not None:
    token_inputs["teacher_tail_logprob"] = jnp.asarray(teacher_tail_logprob).reshape(-1)
  static, arrays = _split_options(core, options)
  fn = functools.partial(_sparse_fn, core, static, temperature, tail)
  loss, values = chunked_linear_loss(fn, hs, ws, token_inputs, shared={"options": arrays},
                                     weights=w, chunk_size=chunk_size)
  return loss, values.reshape(lead)


def _cross_entropy_fn(ignore_index, logits, tok, shared):
  del shared
  return tokens.cross_entropy(logits, tok["labels"], ignore_index=ignore_index,
                              where=tok["where"])


def fused_linear_cross_entropy(hidden: Array, head: Array, labels: Array, *,
                               ignore_index: int = tokens.IGNORE_INDEX,
                               where: Array | None = None, weights: Array | None = None,
                               chunk_size: int = DEFAULT_CHUNK_SIZE,
                               vocab_block: int | None = DEFAULT_VOCAB_BLOCK
                               ) -> tuple[Array, Array]:
  """Cross-entropy against labels from hidden states and head, chunked over tokens.

  Default reduction: the mean over counted tokens (``labels != ignore_index`` and ``where``).
  ``vocab_block``: the head's gradient by vocabulary blocks (as
  :func:`fused_linear_divergence`); ``None``: accumulated over token chunks.

  Returns:
    ``(loss, per_token_ce)`` as :func:`fused_linear_divergence`.

  >>> import jax.numpy as jnp
  >>> loss, _ = fused_linear_cross_entropy(jnp.ones((2, 3)), jnp.zeros((3, 4)), jnp.array([1, 2]))
  >>> round(float(loss), 4)  # log 4
  1.3863
  """
  labels = jnp.asarray(labels)
  mask = tokens.label_mask(labels, ignore_index=ignore_index, where=where)
  hs, ws, mask, w, lead = _flatten(hidden, head, mask, weights, "")
  _common.check_ids(labels, ws.shape[1], "labels", ignore_index=ignore_index)
  if vocab_block is not None:  # The head's gradient by vocabulary blocks.
    loss, values = blocked_linear_loss("cross_entropy", hs, ws, labels=labels.reshape(-1),
                                       weights=w, chunk_size=chunk_size,
                                       vocab_block=vocab_block)
    return loss, jnp.where(mask, values, 0.0).reshape(lead)
  fn = functools.partial(_cross_entropy_fn, ignore_index)
  loss, values = chunked_linear_loss(
      fn, hs, ws, {"labels": labels.reshape(-1), "where": mask}, weights=w,
      chunk_size=chunk_size)
  return loss, values.reshape(lead)


# ---------------------------------------------------------------------------------------------
# The head's gradient by vocabulary blocks (closed-form divergences and cross-entropy).
#
# The token sweep above forms the gradient of the output head chunk by chunk and must add the
# chunks up in a float32 ``[H, V]`` accumulator (2 GiB at H = 4096, V = 128256): at the Llama-3
# vocabulary that accumulator is most of what the fused form holds. For the divergences whose
# gradient with respect to the student's logits is elementwise once a few per-token numbers are
# known (forward and reverse KL, the generalized JSD: see ``divergences._closed_form_parts``) and
# for cross-entropy, the backward pass can instead walk the vocabulary: pass 1 (the forward,
# over token chunks) keeps per token the two log-normalisers and one statistic; pass 2 (the
# backward, over blocks of ``vocab_block`` columns) recomputes both models' logits of the block
# for all tokens, forms the block's logit gradient elementwise, and gets the block's head
# gradient complete in one product (written once into the output, no accumulator) while the
# hidden states' gradient accumulates in float32 ``[N, H]``. It costs one more pair of head
# products than the token sweep.

#: Forms with an elementwise logit gradient: the closed-form divergences and cross-entropy.
BLOCKED = ("forward_kl", "reverse_kl", "generalized_jsd", "cross_entropy")


def _token_stats(kind: str, beta: float, temperature: float, zs: Array, zt: Array | None,
                 labels: Array | None):
  """Per token of a ``[c, V]`` chunk: ``(value, lse_s, lse_t, stat)``, the value ``T^2 D`` (or
  the cross-entropy), the log-normalisers of ``z / T`` and the statistic the gradient needs
  (reverse KL: ``D``; generalized JSD: ``sum q log(q / m)``; otherwise 0)."""
  t = temperature
  lse_s = jax.nn.logsumexp(zs / t, axis=-1)
  log_q = zs / t - lse_s[:, None]
  zero = jnp.zeros_like(lse_s)
  if kind == "cross_entropy":
    picked = jnp.take_along_axis(log_q, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return -picked, lse_s, zero, zero
  lse_t = jax.nn.logsumexp(zt / t, axis=-1)
  log_p = zt / t - lse_t[:, None]
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  if kind == "forward_kl":
    d = jnp.sum(p * divergences._xlogy_diff(p, log_p, log_q), axis=-1)
    return d * t * t, lse_s, lse_t, zero
  if kind == "reverse_kl":
    d = jnp.sum(q * divergences._xlogy_diff(q, log_q, log_p), axis=-1)
    return d * t * t, lse_s, lse_t, d
  log_m = jnp.log(beta * p + (1.0 - beta) * q)
  ds = jnp.sum(q * divergences._xlogy_diff(q, log_q, log_m), axis=-1)
  dt = jnp.sum(p * divergences._xlogy_diff(p, log_p, log_m), axis=-1)
  return (beta * dt + (1.0 - beta) * ds) * t * t, lse_s, lse_t, ds


def _logit_grad(kind: str, beta: float, temperature: float, zs: Array, zt: Array | None,
                stats, labels: Array | None, start) -> Array:
  """``d value / d zs`` of a ``[N, block]`` block of logits starting at column ``start``."""
  t = temperature
  _, lse_s, lse_t, stat = stats
  log_q = zs / t - lse_s[:, None]
  q = jnp.exp(log_q)
  if kind == "cross_entropy":
    columns = start + jnp.arange(zs.shape[1])
    return q - (columns[None, :] == labels[:, None]).astype(q.dtype)
  log_p = zt / t - lse_t[:, None]
  p = jnp.exp(log_p)
  if kind == "forward_kl":
    grad = q - p
  elif kind == "reverse_kl":
    grad = q * (divergences._xlogy_diff(q, log_q, log_p) - stat[:, None])
  else:
    log_m = jnp.log(beta * p + (1.0 - beta) * q)
    grad = (1.0 - beta) * q * (divergences._xlogy_diff(q, log_q, log_m) - stat[:, None])
  return grad * t


def _pass_tokens(kind, beta, temperature, hs, ws, ht, wt, labels, chunk_size):
  """Pass 1: the per-token ``(value, lse_s, lse_t, stat)`` over token chunks."""
  n = hs.shape[0]
  chunked, unchunked = _chunking(n, chunk_size)
  teacher = ht is not None
  xs = (chunked(hs), chunked(ht) if teacher else None,
        chunked(labels) if labels is not None else None)

  def body(_, chunk):
    h, h_t, lab = chunk
    zt = _matmul(h_t, wt) if teacher else None
    return None, _token_stats(kind, beta, temperature, _matmul(h, ws), zt, lab)

  _, stats = jax.lax.scan(body, None, xs)
  return tuple(unchunked(x) for x in stats)


def _pass_vocab(kind, beta, temperature, hs, ws, ht, wt, labels, stats, coef, vocab_block):
  """Pass 2: ``(d loss / d hs, d loss / d ws)`` for per-token loss weights ``coef``."""
  n, v = hs.shape[0], ws.shape[1]
  block = min(vocab_block, v)
  n_blocks = -(-v // block)
  teacher = ht is not None

  def product(a, b):  # float32 result; operands in the hidden states' dtype, as _matmul
    return precision.dot(a, b, dtype=hs.dtype, out_dtype=jnp.float32)

  def body(carry, b):
    grad_h, grad_w = carry
    start = jnp.minimum(b * block, v - block)  # The last block ends at v (it may overlap).
    wsb = jax.lax.dynamic_slice_in_dim(ws, start, block, axis=1)
    zt = _matmul(ht, jax.lax.dynamic_slice_in_dim(wt, start, block, axis=1)) if teacher else None
    g = _logit_grad(kind, beta, temperature, _matmul(hs, wsb), zt, stats, labels, start)
    g = jnp.where(coef[:, None] != 0, g * coef[:, None], 0.0)
    fresh = (start + jnp.arange(block)) >= b * block  # Columns no earlier block had.
    grad_h = grad_h + product(jnp.where(fresh[None, :], g, 0.0), wsb.T)
    grad_w = jax.lax.dynamic_update_slice_in_dim(
        grad_w, product(hs.T, g).astype(ws.dtype), start, axis=1)
    return (partitioning.constrain(grad_h, ("batch", None)), grad_w), None

  init = (partitioning.constrain(jnp.zeros((n, hs.shape[1]), jnp.float32), ("batch", None)),
          jnp.zeros(ws.shape, ws.dtype))
  (grad_h, grad_w), _ = jax.lax.scan(body, init, jnp.arange(n_blocks))
  return grad_h.astype(hs.dtype), grad_w


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _blocked(kind, beta, temperature, chunk_size, vocab_block, hs, ws, ht, wt, labels, weights):
  values = _pass_tokens(kind, beta, temperature, hs, ws, ht, wt, labels, chunk_size)[0]
  return jnp.sum(values * weights), values


def _blocked_fwd(kind, beta, temperature, chunk_size, vocab_block, hs, ws, ht, wt, labels,
                 weights):
  stats = _pass_tokens(kind, beta, temperature, hs, ws, ht, wt, labels, chunk_size)
  values = stats[0]
  return (jnp.sum(values * weights), values), (hs, ws, ht, wt, labels, weights, stats)


def _blocked_bwd(kind, beta, temperature, chunk_size, vocab_block, residuals, cotangents):
  del chunk_size
  hs, ws, ht, wt, labels, weights, stats = residuals
  g_loss, _ = cotangents  # The per-token values are returned detached.
  grad_h, grad_w = _pass_vocab(kind, beta, temperature, hs, ws, ht, wt, labels, stats,
                               g_loss * weights, vocab_block)
  return grad_h, grad_w, None, None, None, g_loss * stats[0]


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_linear_loss(kind: str, hidden: Array, head: Array, *, teacher_hidden: Array | None
                        = None, teacher_head: Array | None = None, labels: Array | None = None,
                        weights: Array, temperature: float = 1.0, beta: float = 0.5,
                        chunk_size: int = DEFAULT_CHUNK_SIZE,
                        vocab_block: int = DEFAULT_VOCAB_BLOCK) -> tuple[Array, Array]:
  """``sum_i weights_i * loss_i`` from ``[N, H]`` hidden states and a ``[H, V]`` head, the
  head's gradient formed by vocabulary blocks (see the comment above).

  Args:
    kind: one of :data:`BLOCKED`.
    hidden, head: the student's hidden states and head (differentiable).
    teacher_hidden, teacher_head: the teacher's (constants; not for ``cross_entropy``).
    labels: ``[N]`` target ids (``cross_entropy``; rows with weight 0 may hold anything).
    weights: ``[N]`` per-token weights (differentiable).
    temperature, beta: as the divergence's.
    chunk_size: tokens per chunk of the forward pass; vocab_block: columns per block of the
      backward pass.

  Returns:
    ``(loss, values)``: the weighted sum and the detached per-token values ``[N]``.
  """
  if kind not in BLOCKED:
    raise ValueError(f"blocked_linear_loss() takes {BLOCKED}, not {kind!r}.")
  if not isinstance(vocab_block, int) or vocab_block <= 0:
    raise ValueError(f"vocab_block must be a positive int (got {vocab_block!r}).")
  hidden, head, _, _, chunk_size = _prepare(hidden, head, None, None, chunk_size)
  stop = jax.lax.stop_gradient
  ht = None if teacher_hidden is None else stop(jnp.asarray(teacher_hidden))
  wt = None if teacher_head is None else stop(jnp.asarray(teacher_head))
  labels = None if labels is None else stop(jnp.asarray(labels, jnp.int32))
  loss, values = _blocked(kind, float(beta), float(temperature), chunk_size, vocab_block,
                          hidden, head, ht, wt, labels, jnp.asarray(weights, jnp.float32))
  return loss, stop(values)
