"""The decode step of :func:`jkd.sampling.generate`: one token per sequence, KV-cached.

A decode step reads every weight to compute a few rows, so it is made lean:

* the layers run unrolled on per-layer weights, prepared once per call (:func:`prepare_layers`):
  ``nn.scan`` over stacked weights would copy each layer's weights and cache slices at each step;
* the q/k/v projections are one matrix product, and so are the MLP's gate and up projections
  (fewer, larger products: small ones are inefficient on CPU, and each is a kernel launch on a
  GPU);
* on XLA:CPU only (:func:`jkd.runtime.xla_cpu`, decided at trace time), the weights are kept
  transposed (``[out, in]``) and each product is formed as ``(W^T x^T)^T``: with a few rows,
  XLA:CPU's matrix kernels stream a tall weight operand much faster than a wide one (SmolLM2 at
  batch 8, each product timed alone: 1.7x for the MLP's gate/up product, 1.2x for the output
  head, little for the others), and optimization barriers keep XLA from folding the transposes
  back into the products. GPUs and TPUs take either operand layout in their matrix units: there
  the weights keep the model's ``[in, out]`` layout (no transposed copies) and each product is
  a plain ``x @ W``, with no barrier;
* the cache keeps keys as ``[B, Kv, D, S]`` and values as ``[B, Kv, S, D]``, so that both
  attention contractions are plain batched matrix products (the model's ``[B, S, Kv, D]`` layout
  makes XLA transpose each layer's cache at each step).

The math is the model's (:mod:`jkd.models.transformer`: its RMSNorm and MoE modules, RoPE
functions and output head); the tests compare the logits with :func:`jkd.models.apply` without
a cache, for every architecture option.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jkd import runtime
from jkd.models import transformer
from jkd.partitioning import constrain
from jkd.models.config import ModelConfig

Array = jax.Array
PyTree = Any


def from_model_cache(cache: dict, config: ModelConfig) -> dict:
  """A cache written by :func:`~jkd.models.apply` (``k``, ``v``: ``[L, B, S, Kv, D]``) in the
  layout of :func:`decode_step` (tuples of ``L`` keys ``[B, Kv, D, S]`` and values
  ``[B, Kv, S, D]``); copied once, after the prefill."""
  out = dict(cache)
  axes = ("batch", "activation_kv_heads", None, None)  # Batch-sharded in the engine's steps.
  out["k"] = tuple(constrain(cache["k"][i].transpose(0, 2, 3, 1), axes)
                   for i in range(config.num_layers))
  out["v"] = tuple(constrain(cache["v"][i].transpose(0, 2, 1, 3), axes)
                   for i in range(config.num_layers))
  return out


def prepare_layers(params: PyTree, config: ModelConfig) -> list[dict]:
  """Per-layer decode weights from the stacked ``layers`` parameters (copied once per call).

  Args:
    params: the model parameters.
    config: the model config.

  Returns:
    One dict per layer: ``attn_norm``, ``mlp_norm`` (norm params), ``qkv`` (``H -> (Nq + 2 Nkv)
    D``), ``qkv_bias`` (or absent), ``o`` (``Nq D -> H``), ``q_norm`` / ``k_norm`` (Qwen3), and
    ``gate_up`` (``H -> 2 F``) + ``down`` (``F -> H``) for a dense MLP or ``moe`` (the module's
    params). The matrices are in :func:`dense`'s layout for the backend that traces this:
    ``[out, in]`` on XLA:CPU, ``[in, out]`` elsewhere.
  """
  cfg = config
  h, d = cfg.hidden_size, cfg.dim_per_head
  layout = _layout()
  out = []
  for i in range(cfg.num_layers):
    p = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    attn = p["attn"]
    layer = {
        "attn_norm": p["attn_norm"], "mlp_norm": p["mlp_norm"],
        "qkv": layout(jnp.concatenate([attn[n]["kernel"].reshape(h, -1) for n in "qkv"], axis=1)),
        "o": layout(attn["o"]["kernel"].reshape(cfg.num_heads * d, h)),
    }
    if cfg.qkv_bias:
      layer["qkv_bias"] = jnp.concatenate([attn[n]["bias"].reshape(-1) for n in "qkv"])
    if cfg.qk_norm:
      layer["q_norm"], layer["k_norm"] = attn["q_norm"], attn["k_norm"]
    if cfg.num_experts:
      layer["moe"] = p["moe"]
    else:
      mlp = p["mlp"]
      layer["gate_up"] = layout(jnp.concatenate([mlp["gate"]["kernel"], mlp["up"]["kernel"]],
                                                axis=1))
      layer["down"] = layout(mlp["down"]["kernel"])
    out.append(layer)
  return out


def prepare_head(params: PyTree, config: ModelConfig) -> Array:
  """The output head in :func:`dense`'s layout: ``[V, H]`` on XLA:CPU (the embedding itself when
  tied; else one transposed copy), the model's ``[H, V]`` elsewhere (no copy)."""
  return _layout()(transformer.output_head(params, config))


def _layout():
  """``[in, out]`` matrices -> :func:`dense`'s layout for the backend tracing now."""
  return jnp.transpose if runtime.xla_cpu() else (lambda w: w)


def dense(x: Array, kernel: Array, dtype) -> Array:
  """``x @ W`` in ``dtype``: ``[B, in] -> [B, out]``, ``kernel`` in the layout of
  :func:`prepare_layers` (``W`` transposed, ``[out, in]``, on XLA:CPU; ``W`` elsewhere).

  On XLA:CPU it is formed as ``(kernel @ x.T).T``, which XLA:CPU computes faster for a few rows
  ``B`` (see the module docstring), with an optimization barrier that keeps XLA from rewriting it
  back. Elsewhere it is the plain product; when ``dtype`` is wider than both operands (a float32
  head over bfloat16 weights) the operands stay narrow and the product accumulates in ``dtype``
  (their products are exact in it: the same numbers without a widened copy of the weights).
  """
  if runtime.xla_cpu():
    y_t = jnp.dot(kernel.astype(dtype), x.astype(dtype).T)
    return jax.lax.optimization_barrier(y_t).T
  dtype = jnp.dtype(dtype)
  narrow = jnp.promote_types(x.dtype, kernel.dtype)
  if jnp.issubdtype(narrow, jnp.floating) and narrow.itemsize * 2 <= dtype.itemsize:
    return jnp.dot(x.astype(narrow), kernel.astype(narrow), preferred_element_type=dtype)
  return jnp.dot(x.astype(dtype), kernel.astype(dtype))


def _attention(layer, x, positions, mask, k_cache, v_cache, index, config: ModelConfig):
  """Self-attention of one new token per sequence (the model's ``Attention``, decode form).

  Args:
    layer: one layer of :func:`prepare_layers`.
    x: ``[B, H]`` normed input.
    positions: ``[B, 1]`` RoPE positions.
    mask: ``[B, S]`` valid cache slots (the new one included).
    k_cache: ``[B, Kv, D, S]``; v_cache: ``[B, Kv, S, D]``.
    index: the slot of the new token.
    config: the model config.

  Returns:
    ``([B, H] output, k_cache, v_cache)``.
  """
  cfg = config
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  d, nh, nkv = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
  b = x.shape[0]
  qkv = dense(x, layer["qkv"], dtype)
  if cfg.qkv_bias:
    qkv = qkv + layer["qkv_bias"].astype(dtype)
  q = qkv[:, :nh * d].reshape(b, 1, nh, d)
  k = qkv[:, nh * d:(nh + nkv) * d].reshape(b, 1, nkv, d)
  v = qkv[:, (nh + nkv) * d:].reshape(b, nkv, 1, d)
  if cfg.qk_norm:
    norm = transformer.RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim")
    q = norm.apply({"params": layer["q_norm"]}, q)
    k = norm.apply({"params": layer["k_norm"]}, k)
  inv_freq = transformer.rope_frequencies(cfg)
  q = transformer.apply_rope(q, positions, inv_freq)
  k = transformer.apply_rope(k, positions, inv_freq)
  k_cache = jax.lax.dynamic_update_slice(
      k_cache, k.reshape(b, nkv, d, 1).astype(k_cache.dtype), (0, 0, 0, index))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
  qg = q.reshape(b, nkv, nh // nkv, d)
  scores = jnp.einsum("bkgd,bkds->bkgs", qg, k_cache.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(dtype), v_cache.astype(dtype))
  return dense(out.reshape(b, nh * d), layer["o"], dtype), k_cache, v_cache


def decode_step(params, layers, head, tok, cache, config: ModelConfig):
  """One token per sequence through the model: ``(logits [B, V], cache)``.

  Args:
    params: the model parameters (for the embedding, final norm and output head).
    layers: :func:`prepare_layers` of them.
    head: :func:`prepare_head` of them.
    tok: ``[B]`` int32 tokens.
    cache: ``{"k", "v": tuples of L arrays (see :func:`from_model_cache`), "mask": [B, S],
      "index": the next slot, "next_position": [B]}``.
    config: the model config.

  Returns:
    ``([B, V] float32 logits, updated cache)``.
  """
  cfg = config
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  b, f = tok.shape[0], cfg.intermediate_size
  index = cache["index"]
  mask = jax.lax.dynamic_update_slice(cache["mask"], jnp.ones((b, 1), bool), (0, index))
  positions = cache["next_position"][:, None]
  hidden_axes = ("batch", "activation_embed")
  x = constrain(jnp.take(params["embed"]["embedding"], tok, axis=0).astype(dtype),
                hidden_axes)  # [B, H]
  norm = transformer.RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
  ks, vs = [], []
  for i, layer in enumerate(layers):
    h, k, v = _attention(layer, norm.apply({"params": layer["attn_norm"]}, x), positions, mask,
                         cache["k"][i], cache["v"][i], index, cfg)
    ks.append(constrain(k, ("batch", "activation_kv_heads", None, None)))
    vs.append(constrain(v, ("batch", "activation_kv_heads", None, None)))
    x = constrain(x + h, hidden_axes)
    y = norm.apply({"params": layer["mlp_norm"]}, x)
    if cfg.num_experts:
      y, _ = transformer.MoE(cfg).apply({"params": layer["moe"]}, y[:, None])
      y = y[:, 0]
    else:
      gate_up = dense(y, layer["gate_up"], dtype)
      y = dense(jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:], layer["down"], dtype)
    x = constrain(x + y, hidden_axes)
  x = norm.apply({"params": params["final_norm"]}, x)
  logits = constrain(dense(x, head, jnp.float32), ("batch", "activation_vocab"))
  return logits, {"k": tuple(ks), "v": tuple(vs), "mask": mask, "index": index + 1,
                  "next_position": cache["next_position"] + 1}
