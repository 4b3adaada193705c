"""The decode step of :func:`jkd.sampling.generate`: one token per sequence, KV-cached.

Lean for the memory-bound regime of decoding: the layers run unrolled on per-layer parameter
and cache arrays (no weight or cache copies out of stacked arrays at each step, which is what
``nn.scan`` costs), and the cache is laid out ``[B, Kv, S, D]`` so that attention over it is a
plain batched matrix product. The math is the model's: the norms, projections, MLP / MoE and
RoPE are :mod:`jkd.models.transformer`'s own modules and functions; the tests compare the logits
with :func:`jkd.models.apply` without a cache.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jkd.models import transformer
from jkd.models.config import ModelConfig

PyTree = Any


def from_model_cache(cache: dict, config: ModelConfig) -> dict:
  """A cache of :func:`~jkd.models.apply` (``k``, ``v``: ``[L, B, S, Kv, D]``) in the layout of
  :func:`decode_step` (tuples of ``L`` arrays ``[B, Kv, S, D]``); copied once, after the prefill.
  """
  out = dict(cache)
  for name in ("k", "v"):
    out[name] = tuple(cache[name][i].transpose(0, 2, 1, 3) for i in range(config.num_layers))
  return out


def split_layers(params: PyTree, config: ModelConfig) -> list[PyTree]:
  """The stacked ``layers`` parameters as one pytree per layer (copied once, before the loop)."""
  return [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(config.num_layers)]


def _attention_step(layer, x, positions, mask, k_cache, v_cache, index, config: ModelConfig):
  """The attention sub-layer of :class:`~jkd.models.transformer.Attention` for one new token.

  The same parameters and math (the projections, q/k norms and RoPE are the model's own
  modules and functions), with the cache laid out ``[B, Kv, S, D]``: the per-head score and value
  contractions are then plain batched matrix products, where the model's ``[B, S, Kv, D]`` cache
  makes XLA transpose every layer's cache at every step (about 5x slower on CPU at batch 8).

  Args:
    layer: one layer's ``attn`` parameters.
    x: ``[B, 1, H]`` normed input.
    positions: ``[B, 1]`` RoPE positions.
    mask: ``[B, S]`` valid cache slots (the new one included).
    k_cache, v_cache: ``[B, Kv, S, D]``.
    index: the slot of the new token.
    config: the model config.

  Returns:
    ``([B, 1, H] output, k_cache, v_cache)``.
  """
  cfg = config
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  d, nh, nkv = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
  b = x.shape[0]

  def proj(name, heads):
    return nn.DenseGeneral((heads, d), use_bias=cfg.qkv_bias, dtype=dtype,
                           param_dtype=pdtype).apply({"params": layer[name]}, x)

  q, k, v = proj("q", nh), proj("k", nkv), proj("v", nkv)  # [B, 1, heads, D]
  if cfg.qk_norm:
    norm = transformer.RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim")
    q = norm.apply({"params": layer["q_norm"]}, q)
    k = norm.apply({"params": layer["k_norm"]}, k)
  inv_freq = transformer.rope_frequencies(cfg)
  q = transformer.apply_rope(q, positions, inv_freq)
  k = transformer.apply_rope(k, positions, inv_freq)
  k_cache = jax.lax.dynamic_update_slice(
      k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, index, 0))
  v_cache = jax.lax.dynamic_update_slice(
      v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0))
  qg = q.reshape(b, nkv, nh // nkv, d)
  scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache.astype(q.dtype),
                      preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bkgs,bksd->bkgd", probs.astype(dtype), v_cache.astype(dtype))
  out = nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=dtype,
                        param_dtype=pdtype).apply({"params": layer["o"]},
                                                  out.reshape(b, 1, nh, d))
  return out, k_cache, v_cache


def decode_step(params, layers, tok, cache, config: ModelConfig):
  """One token per sequence through the model: ``(logits [B, V], cache)``.

  The layers run unrolled, each with its own parameters and KV-cache arrays, so that no step
  copies a layer's weights or cache out of a stacked array (what ``nn.scan`` does, and what
  dominates a CPU decode step). Each layer is :class:`~jkd.models.transformer.Block`'s
  computation from the model's own modules (norms, MLP / MoE, projections) around
  :func:`_attention_step`; the tests check the logits against :func:`~jkd.models.apply`.

  Args:
    params: the model parameters (for the embedding, final norm and output head).
    layers: :func:`split_layers` of them.
    tok: ``[B]`` int32 tokens.
    cache: ``{"k", "v": tuples of L [B, Kv, S, D], "mask": [B, S], "index",
      "next_position": [B]}``.
    config: the model config.

  Returns:
    ``([B, V] float32 logits, updated cache)``.
  """
  cfg = config
  dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  b = tok.shape[0]
  index = cache["index"]
  mask = jax.lax.dynamic_update_slice(cache["mask"], jnp.ones((b, 1), bool), (0, index))
  positions = cache["next_position"][:, None]
  x = jnp.take(params["embed"]["embedding"], tok[:, None], axis=0).astype(dtype)
  norm = transformer.RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
  ks, vs = [], []
  for i, layer in enumerate(layers):
    h, k, v = _attention_step(layer["attn"], norm.apply({"params": layer["attn_norm"]}, x),
                              positions, mask, cache["k"][i], cache["v"][i], index, cfg)
    ks.append(k)
    vs.append(v)
    x = x + h
    y = norm.apply({"params": layer["mlp_norm"]}, x)
    if cfg.num_experts:
      y, _ = transformer.MoE(cfg).apply({"params": layer["moe"]}, y)
    else:
      y = transformer.MLP(cfg).apply({"params": layer["mlp"]}, y)
    x = x + y
  x = norm.apply({"params": params["final_norm"]}, x)
  head = transformer.output_head(params, cfg)
  logits = jnp.dot(x[:, 0].astype(jnp.float32), head.astype(jnp.float32))
  return logits, {"k": tuple(ks), "v": tuple(vs), "mask": mask, "index": index + 1,
                  "next_position": cache["next_position"] + 1}
