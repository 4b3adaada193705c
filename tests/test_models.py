"""jkd.models.transformer against an independent float64 NumPy decoder, plus model options."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import models
from jkd.models import ModelConfig

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
            num_kv_heads=2, rope_theta=500.0, rms_norm_eps=1e-5)


# --- A float64 NumPy decoder written from the architecture's definition. --------------------

def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta, scaling=None):  # x [T, heads, D], half-split (HF) layout
  d = x.shape[-1]
  inv = theta ** (-np.arange(0, d, 2) / d)
  if scaling is not None:  # Llama 3.1 rule, per frequency
    factor, low, high, orig = scaling
    out = []
    for f in inv:
      wl = 2 * np.pi / f
      if wl < orig / high:
        out.append(f)
      elif wl > orig / low:
        out.append(f / factor)
      else:
        s = (orig / wl - low) / (high - low)
        out.append((1 - s) * f / factor + s * f)
    inv = np.array(out)
  ang = pos[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
  return x * cos[:, None] + rot * sin[:, None]


def _silu(x):
  return x / (1 + np.exp(-x))


def numpy_decoder(params, cfg, tokens):
  """Logits [T, V], per-layer outputs, and the MoE aux loss for ONE unpadded sequence."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  x = p["embed"]["embedding"][tokens]
  lay = p["layers"]
  nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
  outs, auxes = [], []
  for i in range(cfg.num_layers):
    h = _rms(x, lay["attn_norm"]["scale"][i], cfg.rms_norm_eps)
    q = np.einsum("th,hnd->tnd", h, lay["attn"]["q"]["kernel"][i])
    k = np.einsum("th,hnd->tnd", h, lay["attn"]["k"]["kernel"][i])
    v = np.einsum("th,hnd->tnd", h, lay["attn"]["v"]["kernel"][i])
    q, k = _rope(q, pos, cfg.rope_theta, cfg.rope_scaling), _rope(k, pos, cfg.rope_theta,
                                                                 cfg.rope_scaling)
    att = np.zeros((t, nh, d))
    for head in range(nh):
      kh = head // (nh // nkv)
      s = q[:, head] @ k[:, kh].T / math.sqrt(d)
      s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      att[:, head] = w @ v[:, kh]
    x = x + np.einsum("tnd,ndh->th", att, lay["attn"]["o"]["kernel"][i])
    h = _rms(x, lay["mlp_norm"]["scale"][i], cfg.rms_norm_eps)
    if cfg.num_experts:
      m = lay["moe"]
      logits = h @ m["router"]["kernel"][i]
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      y = np.zeros_like(h)
      counts = np.zeros(cfg.num_experts)
      for tok in range(t):
        top = np.argsort(-probs[tok])[: cfg.num_experts_per_tok]
        gates = probs[tok, top] / probs[tok, top].sum()
        for g, e in zip(gates, top):
          counts[e] += 1
          a = _silu(h[tok] @ m["gate"][i, e]) * (h[tok] @ m["up"][i, e])
          y[tok] += g * (a @ m["down"][i, e])
      auxes.append(cfg.num_experts * np.sum(counts / (t * cfg.num_experts_per_tok)
                                            * probs.mean(0)))
    else:
      mlp = lay["mlp"]
      y = (_silu(h @ mlp["gate"]["kernel"][i]) * (h @ mlp["up"]["kernel"][i])) @ \
          mlp["down"]["kernel"][i]
    x = x + y
    outs.append(x)
  x = _rms(x, p["final_norm"]["scale"], cfg.rms_norm_eps)
  head = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]
  return x @ head, np.stack(outs), (np.mean(auxes) if auxes else 0.0)


def _params(cfg, seed=0, scale=0.2):
  params = models.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("extra", [
    {},
    {"rope_scaling": (8.0, 1.0, 4.0, 16), "tie_embeddings": False},
    {"num_experts": 4, "num_experts_per_tok": 2},
])
def test_forward_matches_numpy(extra):
  cfg = ModelConfig(**TINY, **extra)
  params = _params(cfg)
  tokens = np.array([3, 17, 5, 44, 0, 9, 21])
  out = jax.jit(lambda p, x: models.apply(p, x, config=cfg, output_hidden_states=True))(
      params, jnp.asarray(tokens[None]))
  ref_logits, ref_hidden, ref_aux = numpy_decoder(params, cfg, tokens)
  np.testing.assert_allclose(out.logits[0], ref_logits, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(out.hidden_states[:, 0], ref_hidden, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(out.aux_loss, ref_aux, rtol=1e-4, atol=1e-6)
  head = models.output_head(params, cfg)
  np.testing.assert_allclose(out.hidden[0] @ head, out.logits[0], atol=1e-4)


def test_left_padding_and_packing_equal_separate_runs():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  a, b = [4, 8, 15, 16], [23, 42, 7]
  single = [models.apply(params, jnp.asarray([s]), config=cfg).logits[0] for s in (a, b)]
  padded = models.apply(params, jnp.asarray([a, [0] + b]), config=cfg,
                        attention_mask=jnp.asarray([[1] * 4, [0, 1, 1, 1]])).logits
  np.testing.assert_allclose(padded[0], single[0], atol=1e-5)
  np.testing.assert_allclose(padded[1, 1:], single[1], atol=1e-5)
  packed = models.apply(params, jnp.asarray([a + b]), config=cfg,
                        segment_ids=jnp.asarray([[1] * 4 + [2] * 3]),
                        positions=jnp.asarray([[0, 1, 2, 3, 0, 1, 2]])).logits[0]
  np.testing.assert_allclose(packed[:4], single[0], atol=1e-5)
  np.testing.assert_allclose(packed[4:], single[1], atol=1e-5)


def test_attentions_are_causal_distributions():
  cfg = ModelConfig(**TINY)
  out = models.apply(_params(cfg), jnp.asarray([[1, 2, 3, 4, 5]]), config=cfg,
                     output_attentions=True)
  att = np.asarray(out.attentions)
  assert att.shape == (3, 1, 4, 5, 5)
  np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(att[..., :, :], k=1) == 0)


def test_remat_unroll_and_bf16_options():
  cfg = ModelConfig(**TINY)
  params = _params(cfg)
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])

  def loss(p, c):
    return jnp.mean(models.apply(p, tokens, config=c).logits ** 2)

  v1, g1 = jax.value_and_grad(loss)(params, cfg)
  for options in (dict(remat=True), dict(scan_unroll=cfg.num_layers), dict(scan_unroll=100)):
    v2, g2 = jax.value_and_grad(loss)(params, cfg.replace(**options))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)
  for bad in (0, True, 1.5):
    with pytest.raises(ValueError, match="scan_unroll must be an int >= 1"):
      cfg.replace(scan_unroll=bad)
  bf = models.apply(params, tokens, config=cfg.replace(dtype="bfloat16")).logits
  assert bf.dtype == jnp.float32
  f32 = models.apply(params, tokens, config=cfg).logits
  assert float(jnp.max(jnp.abs(bf - f32))) < 0.1 * float(jnp.max(jnp.abs(f32)))


def test_param_axes_cover_every_parameter():
  cfg = ModelConfig(**TINY, num_experts=2, num_experts_per_tok=1, tie_embeddings=False)
  params, axes = models.init_params(cfg, jax.random.key(0)), models.param_axes(cfg)
  for x, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
    assert len(spec) == x.ndim
  assert axes["layers"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec(
      "layers", "embed", "heads", "head_dim")


def test_student_from_teacher_keeps_layers():
  cfg = ModelConfig(**{**TINY, "num_layers": 6})
  params = _params(cfg)
  scfg, sparams = models.student_from_teacher(params, cfg, every=3)
  assert scfg.num_layers == 2 and models.layers_every(6, 3) == [2, 5]
  np.testing.assert_array_equal(sparams["layers"]["mlp"]["up"]["kernel"][1],
                                params["layers"]["mlp"]["up"]["kernel"][5])
  tokens = np.array([1, 2, 3])
  np.testing.assert_allclose(models.apply(sparams, jnp.asarray([tokens]), config=scfg).logits[0],
                             numpy_decoder(sparams, scfg, tokens)[0], atol=2e-4)
  with pytest.raises(ValueError, match="exactly one"):
    models.student_from_teacher(params, cfg)
  with pytest.raises(ValueError, match="indices in \\[0, 6\\)"):
    models.student_from_teacher(params, cfg, layers=[0, 6])


def test_config_errors():
  with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
    ModelConfig(architecture="gpt2")
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    ModelConfig(**{**TINY, "num_kv_heads": 3})
  with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'"):
    ModelConfig.from_hf({"model_type": "gpt_neox"})
  with pytest.raises(ValueError, match="sliding-window"):
    ModelConfig.from_hf({"model_type": "mistral", "vocab_size": 10, "hidden_size": 8,
                         "intermediate_size": 8, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "sliding_window": 4096})
  cfg = ModelConfig(**TINY)
  cache = models.init_cache(cfg, 1, 4)
  with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
    models.apply(_params(cfg), jnp.ones((1, 5), jnp.int32), config=cfg, cache=cache)
  with pytest.raises(ValueError, match="tokens must be int"):
    models.apply(_params(cfg), jnp.ones((1, 5)), config=cfg)
