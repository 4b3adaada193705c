"""A Flax decoder-only transformer (Llama / SmolLM / Mistral / Qwen2 / Qwen3, optional MoE).

Used functionally: :func:`init_params` returns a plain parameter pytree (with a parallel tree of
logical axis names, :func:`param_axes`), and :func:`apply` maps ``(params, tokens)`` to logits,
final hidden states (for the fused losses), per-layer hidden states and attention maps (for
feature distillation), the MoE load-balancing loss and an updated KV cache (for the sampler).

The layers are one ``nn.scan`` over stacked parameters (leading axis ``layers``): compile time
does not grow with depth. Logical axis names: ``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``experts``, ``layers``. Activations are constrained to ``batch``,
``activation_length``, ``activation_embed``, ``activation_heads``, ``activation_kv_heads``,
``activation_mlp`` and ``activation_vocab`` (:func:`jkd.partitioning.constrain`: a no-op
outside the engine's :func:`jkd.partitioning.activation_sharding`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkd import precision
from jkd.models.config import ModelConfig
from jkd.partitioning import constrain

Array = jax.Array
PyTree = Any

#: Logical axes of the ``[B, T, H]`` residual stream and hidden states.
HIDDEN_AXES = ("batch", "activation_length", "activation_embed")


def _dense_init(axes):
  return nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class Dense(nn.Module):
  """``nn.DenseGeneral``'s parameters (names, shapes, initial values) with jkd's product.

  The kernel is ``[in..., features...]`` over the last ``contract`` input axes; the product is
  :func:`jkd.precision.dot` in ``dtype`` (float32 accumulation for bfloat16).
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]
  dtype: Any
  param_dtype: Any
  contract: int = 1
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[x.ndim - self.contract:]

    def init(key, shape, dtype):  # As DenseGeneral: drawn as [prod(in), prod(out)], reshaped.
      flat = (math.prod(fan_in), math.prod(self.features))
      return nn.initializers.normal(0.02)(key, flat, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes),
                        fan_in + tuple(self.features), self.param_dtype)
    y = precision.dot(x, kernel, contract=self.contract, dtype=self.dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[self.contract:]), tuple(self.features),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` of RoPE, with the Llama-3 scaling if configured."""
  d = config.dim_per_head
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if config.rope_scaling is None:
    return inv
  factor, low, high, original = config.rope_scaling
  low_wavelen, high_wavelen = original / low, original / high
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
  """Rotary embedding in the Hugging Face (half-split) layout. ``x``: ``[B, T, heads, D]``."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  half = x32.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Attention(nn.Module):
  config: ModelConfig
  output_attentions: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, cache):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, nh, nkv = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads

    def proj(name, heads, axes):
      return Dense((heads, d), ("embed",) + axes, dtype, pdtype, use_bias=cfg.qkv_bias,
                   name=name)(x)

    heads_axes = ("batch", "activation_length", "activation_heads", None)
    kv_axes = ("batch", "activation_length", "activation_kv_heads", None)
    q = constrain(proj("q", nh, ("heads", "head_dim")), heads_axes)
    k = constrain(proj("k", nkv, ("kv_heads", "head_dim")), kv_axes)
    v = constrain(proj("v", nkv, ("kv_heads", "head_dim")), kv_axes)
    if cfg.qk_norm:
      q = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim", name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, "head_dim", name="k_norm")(k)
    inv_freq = rope_frequencies(cfg)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    new_cache = None
    if cache is not None:
      ck, cv, index = cache
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
      new_cache = (k, v)
    b, t = q.shape[:2]
    qg = q.reshape(b, t, nkv, nh // nkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = constrain(scores, ("batch", "activation_kv_heads", None, "activation_length", None))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype),
                     preferred_element_type=jnp.float32).astype(dtype)
    out = constrain(out.reshape(b, t, nh, d), heads_axes)
    out = Dense((cfg.hidden_size,), ("heads", "head_dim", "embed"), dtype, pdtype, contract=2,
                name="o")(out)
    attn = probs.reshape(b, nh, t, -1) if self.output_attentions else None
    return out, new_cache, attn


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dense = lambda n, f, axes: Dense((f,), axes, dtype, pdtype, name=n)  # noqa: E731
    mlp_axes = ("batch", "activation_length", "activation_mlp")
    gate = constrain(dense("gate", cfg.intermediate_size, ("embed", "mlp"))(x), mlp_axes)
    up = constrain(dense("up", cfg.intermediate_size, ("embed", "mlp"))(x), mlp_axes)
    return dense("down", cfg.hidden_size, ("mlp", "embed"))(constrain(nn.silu(gate) * up,
                                                                       mlp_axes))


class MoE(nn.Module):
  """Top-k routed SwiGLU experts (Mixtral-style gating) with the Switch load-balancing loss.

  Every expert runs on every token and the outputs are mixed by the (sparse) gates: simple and
  exact, meant for small MoE students.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, k, h, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.intermediate_size
    router = nn.DenseGeneral(e, use_bias=False, dtype=jnp.float32, param_dtype=pdtype,
                             kernel_init=_dense_init(("embed", "experts")), name="router")
    probs = jax.nn.softmax(router(x.astype(jnp.float32)), axis=-1)  # [B, T, E]
    top_p, top_i = jax.lax.top_k(probs, k)
    gates = jnp.sum(jax.nn.one_hot(top_i, e) * (top_p / jnp.sum(top_p, -1, keepdims=True))[
        ..., None], axis=-2)  # [B, T, E], zero off the top-k
    w = lambda n, shape, axes: self.param(n, _dense_init(axes), shape, pdtype)  # noqa: E731
    w_gate = w("gate", (e, h, f), ("experts", "embed", "mlp"))
    w_up = w("up", (e, h, f), ("experts", "embed", "mlp"))
    w_down = w("down", (e, f, h), ("experts", "mlp", "embed"))
    xc = x.astype(dtype)
    act = nn.silu(jnp.einsum("bth,ehf->btef", xc, w_gate.astype(dtype))) * jnp.einsum(
        "bth,ehf->btef", xc, w_up.astype(dtype))
    out = jnp.einsum("btef,efh->bteh", act, w_down.astype(dtype))
    y = jnp.einsum("bteh,bte->bth", out.astype(jnp.float32), gates).astype(dtype)
    # Switch Transformer loss: E * sum_e (share of routed slots to e) * (mean router prob of e).
    routed = jnp.mean(jnp.sum(jax.nn.one_hot(top_i, e), axis=-2), axis=(0, 1)) / k
    aux = e * jnp.sum(routed * jnp.mean(probs, axis=(0, 1)))
    return y, aux


class Block(nn.Module):
  config: ModelConfig
  output_attentions: bool = False

  @nn.compact
  def __call__(self, x, positions, mask, cache_k, cache_v, cache_index):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    cache = None if cache_k is None else (cache_k, cache_v, cache_index)
    x = constrain(x, HIDDEN_AXES)
    h, new_cache, attn = Attention(cfg, self.output_attentions, name="attn")(
        RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="attn_norm")(x), positions, mask, cache)
    x = constrain(x + h, HIDDEN_AXES)
    y = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="mlp_norm")(x)
    if cfg.num_experts:
      y, aux = MoE(cfg, name="moe")(y)
    else:
      y, aux = MLP(cfg, name="mlp")(y), jnp.zeros((), jnp.float32)
    x = constrain(x + y, HIDDEN_AXES)
    new_k, new_v = (None, None) if new_cache is None else new_cache
    return x, (new_k, new_v, x, attn, aux)


class Decoder(nn.Module):
  config: ModelConfig
  output_attentions: bool = False

  @nn.compact
  def __call__(self, tokens, positions, mask, cache_k=None, cache_v=None, cache_index=None):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                 ("vocab", "embed")),
                     name="embed")
    x = constrain(embed(tokens), HIDDEN_AXES)
    block = Block
    if cfg.remat:
      block = nn.remat(block, prevent_cse=False)
    layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                     length=cfg.num_layers, unroll=min(cfg.scan_unroll, cfg.num_layers),
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, (new_k, new_v, hiddens, attns, aux) = layers(cfg, self.output_attentions, name="layers")(
        x, positions, mask, cache_k, cache_v, cache_index)
    x = constrain(RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="final_norm")(x), HIDDEN_AXES)
    if not cfg.tie_embeddings:
      self.param("lm_head", _dense_init(("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size),
                 pdtype)
    return x, (new_k, new_v, hiddens, attns, aux)


class ModelOutput(NamedTuple):
  """What :func:`apply` returns; fields not asked for are ``None``.

  Attributes:
    logits: ``[B, T, V]`` float32 logits.
    hidden: ``[B, T, H]`` final hidden states (after the final norm), for the fused losses.
    hidden_states: ``[L, B, T, H]`` output of each layer.
    attentions: ``[L, B, heads, T, S]`` attention probabilities.
    aux_loss: scalar MoE load-balancing loss (mean over layers; 0 for dense models).
    cache: the updated KV cache (when one was given).
  """
  logits: Array | None
  hidden: Array | None
  hidden_states: Array | None
  attentions: Array | None
  aux_loss: Array
  cache: dict | None


def _module(config: ModelConfig, output_attentions: bool = False) -> Decoder:
  return Decoder(config, output_attentions)


def init_params(config: ModelConfig, key: Array) -> PyTree:
  """Random parameters (normal(0.02) weights, unit norms) as a plain pytree."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = _module(config).init(key, tokens, jnp.zeros((1, 1), jnp.int32),
                                   jnp.ones((1, 1, 1), bool))
  return nn.unbox(variables["params"])


def param_axes(config: ModelConfig) -> PyTree:
  """Logical axis names of every parameter, as ``jax.sharding.PartitionSpec`` leaves."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda: _module(config).init(
      jax.random.key(0), tokens, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool)))
  return nn.get_partition_spec(abstract["params"])


def output_head(params: PyTree, config: ModelConfig) -> Array:
  """The ``[H, V]`` output-head matrix (the transposed embedding when tied)."""
  if config.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["lm_head"]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
  """An empty KV cache of ``max_len`` slots for ``batch`` sequences."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.dim_per_head)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
          "next_position": jnp.zeros((batch,), jnp.int32)}


def apply(params: PyTree, tokens: Array, *, config: ModelConfig,
          attention_mask: Array | None = None, positions: Array | None = None,
          segment_ids: Array | None = None, cache: dict | None = None,
          return_logits: bool = True, output_hidden_states: bool = False,
          output_attentions: bool = False) -> ModelOutput:
  """Runs the decoder.

  Args:
    params: parameters from :func:`init_params` or a checkpoint loader.
    tokens: ``[B, T]`` int token ids.
    config: the model's :class:`ModelConfig`.
    attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (left or right).
    positions: ``[B, T]`` RoPE positions; default: count of real tokens before each one
      (so left padding does not shift positions), continuing from the cache.
    segment_ids: ``[B, T]`` ids of packed documents: no attention across segments (positions
      should then restart per segment; pass them).
    cache: a KV cache from :func:`init_cache`; the tokens are written at its ``index``.
    return_logits: compute ``[B, T, V]`` logits (skip them for the fused losses).
    output_hidden_states, output_attentions: also return per-layer states / attention maps.

  Returns:
    :class:`ModelOutput`.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be int [batch, seq], got {tokens.dtype}{list(tokens.shape)}.")
  b, t = tokens.shape
  valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
  if cache is None:
    key_valid, q_slot, k_slot, start = valid, jnp.arange(t), jnp.arange(t), 0
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  else:
    max_len = cache["mask"].shape[1]
    if not isinstance(cache["index"], jax.core.Tracer) and int(cache["index"]) + t > max_len:
      raise ValueError(f"the KV cache holds {max_len} tokens: {int(cache['index'])} written +"
                       f" {t} new exceed it. Make a larger cache (prompt + max_new_tokens).")
    start = cache["index"]
    key_valid = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, start))
    q_slot, k_slot = start + jnp.arange(t), jnp.arange(max_len)
    if positions is None:
      positions = cache["next_position"][:, None] + jnp.maximum(
          jnp.cumsum(valid, axis=1) - 1, 0)
  mask = (k_slot[None, None, :] <= q_slot[None, :, None]) & key_valid[:, None, :]
  if segment_ids is not None:
    if cache is not None:
      raise ValueError("segment_ids (packing) are for training; they cannot be combined with a"
                       " KV cache.")
    seg = jnp.asarray(segment_ids)
    mask = mask & (seg[:, :, None] == seg[:, None, :])
  module = _module(config, output_attentions)
  ck = cv = None
  if cache is not None:
    ck, cv = cache["k"], cache["v"]
  hidden, (new_k, new_v, hiddens, attns, aux) = module.apply(
      {"params": params}, tokens, positions, mask, ck, cv, start)
  logits = None
  if return_logits:
    # Cast before the weights are gathered (FSDP): a bfloat16 run gathers half the bytes.
    head = constrain(output_head(params, config).astype(config.dtype),
                     ("activation_embed", "activation_vocab"))
    logits = constrain(precision.dot(hidden, head, dtype=config.dtype, out_dtype=jnp.float32),
                       ("batch", "activation_length", "activation_vocab"))
  new_cache = None
  if cache is not None:
    new_cache = {"k": new_k, "v": new_v, "mask": key_valid, "index": start + t,
                 "next_position": cache["next_position"] + jnp.sum(valid, axis=1)}
  return ModelOutput(logits=logits, hidden=hidden,
                     hidden_states=hiddens if output_hidden_states else None,
                     attentions=attns if output_attentions else None,
                     aux_loss=jnp.mean(aux), cache=new_cache)
