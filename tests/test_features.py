"""Tests for jkd.losses.features against independent float64 NumPy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jkd.losses import features as F

RTOL, ATOL = 1e-5, 1e-6


def x64():
  return jax.enable_x64(True)


def rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def probs(seed, *shape):
  """Random row-stochastic attention maps (all entries > 0)."""
  z = np.random.default_rng(seed).normal(size=shape)
  e = np.exp(z - z.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def finite_grad(fn, *args):
  total = lambda *a: jnp.sum(fn(*a))
  grads = jax.jit(jax.grad(total, argnums=tuple(range(len(args)))))(*args)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))), g


# ----------------------------------------------------------------------------------------------
# float64 NumPy references, written from the formulas.
# ----------------------------------------------------------------------------------------------

def np_norm(x):
  return np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=-1))


def np_unit(x):
  x = np.asarray(x, np.float64)
  n = np_norm(x)[..., None]
  return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def ref_hidden(s, t, w=None, metric="mse"):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  if w is not None:
    s = s @ np.asarray(w, np.float64)
  if metric == "mse":
    return np.mean((s - t) ** 2, axis=-1)
  den = np_norm(s) * np_norm(t)
  cos = np.divide(np.sum(s * t, -1), den, out=np.zeros_like(den), where=den > 0)
  return 1.0 - cos


def ref_attention(s, t, heads="mean", metric="mse", where=None):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  b_, _, n, _ = s.shape
  where = np.ones((b_, n), bool) if where is None else np.asarray(where)

  def dist(a, p, keys):
    out = np.zeros(n)
    for q in range(n):
      ks = [k for k in range(n) if keys[k]]
      if metric == "mse":
        out[q] = sum((a[q, k] - p[q, k]) ** 2 for k in ks) / max(len(ks), 1)
      else:
        out[q] = sum(p[q, k] * (np.log(p[q, k]) - np.log(a[q, k])) for k in ks if p[q, k] > 0)
    return out

  out = np.zeros((b_, n))
  for b in range(b_):
    if heads == "mean":
      d = dist(s[b].mean(0), t[b].mean(0), where[b])
    else:
      d = np.mean([dist(s[b, h], t[b, h], where[b]) for h in range(s.shape[1])], axis=0)
    out[b] = np.where(where[b], d, 0.0)
  return out


def ref_relation(s, t, where=None):
  b_, n = s.shape[:2]
  where = np.ones((b_, n), bool) if where is None else np.asarray(where)
  out = np.zeros((b_, n))
  for b in range(b_):
    us, ut = np_unit(s[b]), np_unit(t[b])
    d = (us @ us.T - ut @ ut.T) ** 2
    out[b] = np.where(where[b], d[:, where[b]].mean(-1), 0.0)
  return out


def ref_nd(s, t, c):
  s, t, c = (np.asarray(a, np.float64) for a in (s, t, c))
  proj = np.sum(s * np_unit(c), -1)
  den = np.maximum(np_norm(s), np_norm(t))
  return 1.0 - np.divide(proj, den, out=np.zeros_like(den), where=den > 0)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ref_plan(w, eps, iters):
  n = w.shape[0]
  p = np.exp(-w / eps)
  for _ in range(iters):
    p = p / p.sum(1, keepdims=True) / n
    p = p / p.sum(0, keepdims=True) / n
  return p


def ref_sinkhorn(zs, zt, temperature=2.0, eps=0.1, iters=20, where=None):
  zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
  if where is not None:
    zs, zt = zs[np.asarray(where)], zt[np.asarray(where)]
  ps, pt = np_softmax(zs / temperature), np_softmax(zt / temperature)
  w = np.abs(ps[:, None, :] - pt[None, :, :]).sum(-1)
  return float(np.sum(ref_plan(w, eps, iters) * w))


# ----------------------------------------------------------------------------------------------
# hidden_state_loss, init_projection
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_values_with_and_without_projection(metric):
  s, t, w = rand(0, 2, 3, 4), rand(1, 2, 3, 6), rand(2, 4, 6)
  fn = jax.jit(functools.partial(F.hidden_state_loss, metric=metric))
  close(fn(s, t, projection=w), ref_hidden(s, t, w, metric))
  t4 = rand(3, 2, 3, 4)
  close(fn(s, t4), ref_hidden(s, t4, None, metric))


@pytest.mark.parametrize("metric", ["mse", "cosine"])
def test_hidden_grads_and_teacher_constant(metric):
  with x64():
    s, t, w = (np.float64(a) for a in (rand(0, 3, 4), rand(1, 3, 5), rand(2, 4, 5)))
    fn = jax.jit(lambda s_, w_: F.hidden_state_loss(s_, t, projection=w_, metric=metric))
    check_grads(fn, (s, w), order=1, modes=["rev"])
    g_t = jax.grad(lambda t_: jnp.sum(F.hidden_state_loss(s, t_, projection=w, metric=metric)))(t)
    assert np.all(np.asarray(g_t) == 0)


def test_hidden_mask_and_zero_vectors():
  s, t = rand(0, 2, 4, 3), rand(1, 2, 4, 3)
  s[0, 1] = 0.0
  t[1, 2] = 0.0
  where = np.array([[1, 1, 0, 1], [1, 1, 1, 0]], bool)
  fn = jax.jit(functools.partial(F.hidden_state_loss, metric="cosine"))
  out = fn(s, t, where=where)
  close(out, np.where(where, ref_hidden(s, t, None, "cosine"), 0.0))
  assert float(out[0, 1]) == pytest.approx(1.0) and float(out[1, 2]) == pytest.approx(1.0)
  assert np.all(np.asarray(out)[~where] == 0)
  finite_grad(lambda a: F.hidden_state_loss(a, t, metric="cosine"), s)
  finite_grad(lambda a: F.hidden_state_loss(a, jnp.zeros_like(a), metric="cosine"), s)


def test_hidden_bf16():
  s, t = rand(0, 3, 8), rand(1, 3, 8)
  fn = jax.jit(F.hidden_state_loss)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = fn(sb, tb)
  assert out.dtype == jnp.float32
  close(out, ref_hidden(np.asarray(sb, np.float32), np.asarray(tb, np.float32)))
  close(out, ref_hidden(s, t), rtol=3e-2, atol=1e-2)


def test_hidden_errors():
  s, t = jnp.ones((2, 4)), jnp.ones((2, 6))
  with pytest.raises(ValueError, match=r"student width 4 != teacher width 6: pass projection"):
    F.hidden_state_loss(s, t)
  with pytest.raises(ValueError, match=r"projection has shape \(6, 4\).*\(4, 6\)"):
    F.hidden_state_loss(s, t, projection=jnp.ones((6, 4)))
  with pytest.raises(TypeError, match="projection must be a floating-point"):
    F.hidden_state_loss(s, t, projection=jnp.ones((4, 6), jnp.int32))
  with pytest.raises(TypeError, match="student_hidden must be a floating-point"):
    F.hidden_state_loss(jnp.ones((2, 4), jnp.int32), s)
  with pytest.raises(ValueError, match="same positions"):
    F.hidden_state_loss(s, jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="feature axis"):
    F.hidden_state_loss(jnp.float32(1.0), jnp.float32(1.0))
  with pytest.raises(ValueError, match="did you mean 'cosine'"):
    F.hidden_state_loss(s, s, metric="cosin")
  with pytest.raises(ValueError, match=r"where has shape \(4,\)"):
    F.hidden_state_loss(s, s, where=jnp.ones(4, bool))


def test_init_projection():
  w = F.init_projection(jax.random.key(0), 64, 256)
  assert w.shape == (64, 256) and w.dtype == jnp.float32
  assert abs(float(jnp.std(w)) * 8.0 - 1.0) < 0.05  # variance 1 / student_dim
  assert F.init_projection(jax.random.key(1), 3, 2, jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="student_dim must be >= 1"):
    F.init_projection(jax.random.key(0), 0, 4)
  with pytest.raises(TypeError, match="teacher_dim must be a Python int"):
    F.init_projection(jax.random.key(0), 4, 4.0)
  with pytest.raises(TypeError, match="floating-point dtype"):
    F.init_projection(jax.random.key(0), 4, 4, jnp.int32)


# ----------------------------------------------------------------------------------------------
# Layer maps
# ----------------------------------------------------------------------------------------------

def test_uniform_layer_map_values():
  assert F.uniform_layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
  assert F.uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]
  assert F.uniform_layer_map(4, 2) == [(0, 0), (1, 0), (2, 1), (3, 1)]
  assert F.uniform_layer_map(1, 5) == [(0, 4)]
  assert F.uniform_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize("ns", range(1, 9))
@pytest.mark.parametrize("nt", range(1, 13))
def test_uniform_layer_map_rule(ns, nt):
  # Independent statement of the rule: the shallowest teacher layer whose relative depth
  # (j + 1) / nt is at least the student layer's (i + 1) / ns.
  expected = [(i, min(j for j in range(nt) if (j + 1) * ns >= (i + 1) * nt)) for i in range(ns)]
  assert F.uniform_layer_map(ns, nt) == expected
  assert expected[-1] == (ns - 1, nt - 1)


def test_uniform_layer_map_errors():
  with pytest.raises(ValueError, match="num_student_layers must be >= 1"):
    F.uniform_layer_map(0, 4)
  with pytest.raises(TypeError, match="num_teacher_layers must be a Python int"):
    F.uniform_layer_map(2, 4.5)


def test_layer_map_hidden_values():
  ss = [rand(i, 2, 3, 4) for i in range(2)]
  ts = [rand(10 + i, 2, 3, 6) for i in range(4)]
  ws = [rand(20 + i, 4, 6) for i in range(2)]
  lmap = F.uniform_layer_map(2, 4)
  where = np.array([[1, 0, 1], [1, 1, 0]], bool)
  expected = np.mean([ref_hidden(ss[i], ts[j], w, "cosine") for (i, j), w in zip(lmap, ws)], 0)
  fn = jax.jit(functools.partial(F.layer_map_hidden_loss, layer_map=lmap, metric="cosine"))
  close(fn(ss, ts, projections=ws), expected)
  close(fn(np.stack(ss), np.stack(ts), projections=np.stack(ws)), expected)
  out = fn(ss, ts, projections=ws, where=where)
  close(out, np.where(where, expected, 0.0))
  shared = np.mean([ref_hidden(ss[i], ts[j], ws[0]) for i, j in lmap], 0)
  close(jax.jit(F.layer_map_hidden_loss, static_argnums=2)(ss, ts, tuple(lmap),
                                                           projections=ws[0]), shared)
  # Per-pair projections with None where the widths already agree.
  mixed_teacher = [rand(30, 2, 3, 4), ts[1]]
  expected = (ref_hidden(ss[0], mixed_teacher[0]) + ref_hidden(ss[1], ts[1], ws[1])) / 2
  close(F.layer_map_hidden_loss(ss, mixed_teacher, [(0, 0), (1, 1)], projections=[None, ws[1]]),
        expected)


def test_layer_map_hidden_grads():
  with x64():
    ss = np.float64(rand(0, 2, 3, 4))
    ts = np.float64(rand(1, 3, 3, 4))
    fn = jax.jit(lambda a: F.layer_map_hidden_loss(a, ts, [(0, 1), (1, 2)]))
    check_grads(fn, (ss,), order=1, modes=["rev"])


def test_layer_map_hidden_errors():
  ss, ts = [jnp.ones((3, 4))] * 2, [jnp.ones((3, 4))] * 3
  with pytest.raises(ValueError, match=r"student layer 2 is out of range \[0, 2\)"):
    F.layer_map_hidden_loss(ss, ts, [(0, 0), (2, 1)])
  with pytest.raises(ValueError, match=r"teacher layer -1 is out of range \[0, 3\)"):
    F.layer_map_hidden_loss(ss, ts, [(0, -1)])
  with pytest.raises(ValueError, match=r"teacher layer 3 is out of range"):
    F.layer_map_hidden_loss(jnp.stack(ss), jnp.stack(ts), [(0, 3)])
  with pytest.raises(TypeError, match=r"layer_map\[0\] .* pair of ints"):
    F.layer_map_hidden_loss(ss, ts, [(0, 1.0)])
  with pytest.raises(ValueError, match="non-empty sequence"):
    F.layer_map_hidden_loss(ss, ts, [])
  with pytest.raises(ValueError, match="got 1 projections for 2 layer pairs"):
    F.layer_map_hidden_loss(ss, ts, [(0, 0), (1, 1)], projections=[jnp.eye(4)])
  with pytest.raises(TypeError, match="projections must be None"):
    F.layer_map_hidden_loss(ss, ts, [(0, 0)], projections=jnp.ones(4))
  with pytest.raises(ValueError, match="student_hiddens is empty"):
    F.layer_map_hidden_loss([], ts, [(0, 0)])
  with pytest.raises(TypeError, match="teacher_hiddens must be a sequence"):
    F.layer_map_hidden_loss(ss, {"a": 1}, [(0, 0)])
  with pytest.raises(ValueError, match="every layer must cover the same positions"):
    F.layer_map_hidden_loss([jnp.ones((3, 4)), jnp.ones((2, 4))],
                            [jnp.ones((3, 4)), jnp.ones((2, 4))], [(0, 0), (1, 1)])
  with pytest.raises(ValueError, match="student width 4 != teacher width 5"):
    F.layer_map_hidden_loss(ss, [jnp.ones((3, 5))], [(0, 0)])


# ----------------------------------------------------------------------------------------------
# attention_transfer_loss
# ----------------------------------------------------------------------------------------------

CASES = [("mean", "mse"), ("mean", "kl"), ("match", "mse"), ("match", "kl")]


@pytest.mark.parametrize("heads,metric", CASES)
def test_attention_values_and_mask(heads, metric):
  hs = 3
  s, t = probs(0, 2, hs, 5, 5), probs(1, 2, 3 if heads == "match" else 2, 5, 5)
  fn = jax.jit(functools.partial(F.attention_transfer_loss, heads=heads, metric=metric))
  close(fn(s, t), ref_attention(s, t, heads, metric))
  where = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  out = fn(s, t, where=where)
  close(out, ref_attention(s, t, heads, metric, where))
  assert np.all(np.asarray(out)[~where] == 0)
  # Padding at the end: same as the sliced sequence.
  close(out[0, :3], fn(s[:1, :, :3, :3], t[:1, :, :3, :3])[0], rtol=1e-6)


@pytest.mark.parametrize("heads,metric", CASES)
def test_attention_grads(heads, metric):
  with x64():
    s, t = np.float64(probs(0, 1, 2, 4, 4)), np.float64(probs(1, 1, 2, 4, 4))
    where = np.array([[1, 1, 0, 1]], bool)
    fn = jax.jit(lambda a: F.attention_transfer_loss(a, t, heads=heads, metric=metric,
                                                     where=where))
    check_grads(fn, (s,), order=1, modes=["rev"])
    g_t = jax.grad(lambda b: jnp.sum(F.attention_transfer_loss(s, b, heads=heads,
                                                               metric=metric)))(t)
    assert np.all(np.asarray(g_t) == 0)


def test_attention_zero_rows_and_bf16():
  s, t = probs(0, 1, 2, 4, 4), probs(1, 1, 2, 4, 4)
  s[0, :, 3] = 0.0  # fully masked rows in some implementations
  t[0, :, 2] = 0.0
  for metric in ("mse", "kl"):
    out = jax.jit(functools.partial(F.attention_transfer_loss, metric=metric))(s, t)
    assert np.all(np.isfinite(np.asarray(out)))
    finite_grad(lambda a, m=metric: F.attention_transfer_loss(a, t, metric=m), s)
  s, t = probs(2, 2, 2, 4, 4), probs(3, 2, 2, 4, 4)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = jax.jit(functools.partial(F.attention_transfer_loss, metric="kl"))(sb, tb)
  assert out.dtype == jnp.float32
  close(out, ref_attention(np.asarray(sb, np.float32), np.asarray(tb, np.float32), metric="kl"))
  close(out, ref_attention(s, t, metric="kl"), rtol=5e-2, atol=5e-3)


def test_attention_errors():
  a = jnp.full((1, 2, 3, 3), 1 / 3)
  with pytest.raises(ValueError, match=r"student_attention must be \[batch, heads, seq, seq\]"):
    F.attention_transfer_loss(a[0], a)
  with pytest.raises(ValueError, match=r"teacher_attention must be .*got shape \(1, 2, 3, 4\)"):
    F.attention_transfer_loss(a, jnp.ones((1, 2, 3, 4)))
  with pytest.raises(ValueError, match="share batch and sequence"):
    F.attention_transfer_loss(a, jnp.ones((2, 2, 3, 3)))
  with pytest.raises(ValueError, match=r"heads='match' needs equal head counts \(student 2, "
                     r"teacher 4\); use heads='mean'"):
    F.attention_transfer_loss(a, jnp.ones((1, 4, 3, 3)), heads="match")
  with pytest.raises(ValueError, match="unknown heads 'avg'"):
    F.attention_transfer_loss(a, a, heads="avg")
  with pytest.raises(ValueError, match="unknown metric 'cosine'"):
    F.attention_transfer_loss(a, a, metric="cosine")
  with pytest.raises(ValueError, match=r"where has shape \(1, 2\)"):
    F.attention_transfer_loss(a, a, where=jnp.ones((1, 2), bool))
  with pytest.raises(TypeError, match="where must be a boolean mask"):
    F.attention_transfer_loss(a, a, where=jnp.ones((1, 3)))


# ----------------------------------------------------------------------------------------------
# token_relation_loss
# ----------------------------------------------------------------------------------------------

def test_relation_values_mask_and_slice():
  s, t = rand(0, 2, 5, 3), rand(1, 2, 5, 7)
  fn = jax.jit(F.token_relation_loss)
  close(fn(s, t), ref_relation(s, t))
  where = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  out = fn(s, t, where=where)
  close(out, ref_relation(s, t, where))
  assert np.all(np.asarray(out)[~where] == 0)
  close(out[1, :2], fn(s[1:, :2], t[1:, :2])[0], rtol=1e-6)


def test_relation_grads_and_zero_vectors():
  with x64():
    s, t = np.float64(rand(0, 1, 4, 3)), np.float64(rand(1, 1, 4, 5))
    check_grads(jax.jit(lambda a: F.token_relation_loss(a, t)), (s,), order=1, modes=["rev"])
    g_t = jax.grad(lambda b: jnp.sum(F.token_relation_loss(s, b)))(t)
    assert np.all(np.asarray(g_t) == 0)
  s, t = rand(2, 2, 4, 3), rand(3, 2, 4, 3)
  s[:, 3] = 0.0  # padding as zero vectors
  t[:, 3] = 0.0
  where = np.array([[1, 1, 1, 0]] * 2, bool)
  for w in (None, where):
    out = jax.jit(F.token_relation_loss)(s, t, where=w)
    close(out, ref_relation(s, t, w))
    finite_grad(lambda a, w=w: F.token_relation_loss(a, t, where=w), s)


def test_relation_bf16_and_errors():
  s, t = rand(0, 2, 4, 8), rand(1, 2, 4, 8)
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  out = jax.jit(F.token_relation_loss)(sb, tb)
  assert out.dtype == jnp.float32
  close(out, ref_relation(np.asarray(sb, np.float32), np.asarray(tb, np.float32)))
  close(out, ref_relation(s, t), rtol=5e-2, atol=5e-3)
  with pytest.raises(ValueError, match=r"student_hidden must be \[batch, seq, hidden\]"):
    F.token_relation_loss(s[0], t)
  with pytest.raises(ValueError, match="share batch and sequence sizes"):
    F.token_relation_loss(s, t[:, :3])
  with pytest.raises(TypeError, match="teacher_hidden must be a floating-point"):
    F.token_relation_loss(s, np.ones((2, 4, 8), np.int32))
  with pytest.raises(ValueError, match=r"where has shape \(2, 3\)"):
    F.token_relation_loss(s, t, where=np.ones((2, 3), bool))


# ----------------------------------------------------------------------------------------------
# norm_direction_loss
# ----------------------------------------------------------------------------------------------

def test_nd_values_mask_bf16():
  s, t, c = rand(0, 2, 3, 4), rand(1, 2, 3, 4), rand(2, 2, 3, 4)
  fn = jax.jit(F.norm_direction_loss)
  close(fn(s, t, c), ref_nd(s, t, c))
  close(fn(s, t, c[0, 0]), ref_nd(s, t, c[0, 0]))  # one shared centre
  where = np.array([[1, 0, 1], [0, 1, 1]], bool)
  out = fn(s, t, c, where=where)
  close(out, np.where(where, ref_nd(s, t, c), 0.0))
  assert np.all(np.asarray(out)[~where] == 0)
  sb = jnp.asarray(s, jnp.bfloat16)
  out = fn(sb, t, c)
  assert out.dtype == jnp.float32
  close(out, ref_nd(np.asarray(sb, np.float32), t, c))


def test_nd_grads_zero_vectors_and_errors():
  with x64():
    s, t, c = (np.float64(rand(i, 3, 4)) for i in range(3))
    check_grads(jax.jit(lambda a: F.norm_direction_loss(a, t, c)), (s,), order=1,
                modes=["rev"])
    g = jax.grad(lambda b, d: jnp.sum(F.norm_direction_loss(s, b, d)), argnums=(0, 1))(t, c)
    assert all(np.all(np.asarray(x) == 0) for x in g)
  s, t, c = rand(0, 4, 3), rand(1, 4, 3), rand(2, 4, 3)
  s[0], t[0] = 0.0, 0.0
  s[1] = 0.0
  c[2] = 0.0
  out = jax.jit(F.norm_direction_loss)(s, t, c)
  close(out, ref_nd(s, t, c))
  assert float(out[0]) == 1.0 and float(out[1]) == 1.0 and float(out[2]) == 1.0
  finite_grad(lambda a: F.norm_direction_loss(a, t, c), s)
  with pytest.raises(ValueError, match="must have the same shape"):
    F.norm_direction_loss(s, t[:, :2], c)
  with pytest.raises(ValueError, match=r"class_centers shape \(2,\) must broadcast"):
    F.norm_direction_loss(s, t, c[0, :2])
  with pytest.raises(ValueError, match=r"where has shape \(3,\)"):
    F.norm_direction_loss(s, t, c, where=np.ones(3, bool))


# ----------------------------------------------------------------------------------------------
# sinkhorn_plan, sinkhorn_loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,eps,iters", [(2.0, 0.1, 20), (1.0, 0.05, 7),
                                                   (4.0, 0.01, 20)])
def test_sinkhorn_values(temperature, eps, iters):
  zs, zt = 2 * rand(0, 6, 5), 2 * rand(1, 6, 5)
  fn = jax.jit(functools.partial(F.sinkhorn_loss, temperature=temperature, epsilon=eps,
                                 iterations=iters))
  close(fn(zs, zt), ref_sinkhorn(zs, zt, temperature, eps, iters))


def test_sinkhorn_mask_equals_slice():
  zs, zt = 2 * rand(0, 6, 5), 2 * rand(1, 6, 5)
  where = np.array([1, 0, 1, 1, 0, 1], bool)
  fn = jax.jit(F.sinkhorn_loss)
  out = fn(zs, zt, where=where)
  close(out, ref_sinkhorn(zs, zt, where=where))
  close(out, fn(zs[where], zt[where]), rtol=1e-6)
  assert float(fn(zs, zt, where=np.zeros(6, bool))) == 0.0
  finite_grad(lambda a: F.sinkhorn_loss(a, zt, where=np.zeros(6, bool)), zs)
  finite_grad(lambda a: F.sinkhorn_loss(a, zt, where=where), zs)


def test_sinkhorn_grads_vs_numpy_and_check_grads():
  with x64():
    zs, zt = np.float64(rand(0, 4, 3)), np.float64(rand(1, 4, 3))
    where = np.array([1, 1, 0, 1], bool)
    fn = jax.jit(lambda a: F.sinkhorn_loss(a, zt, epsilon=0.2, iterations=10, where=where))
    check_grads(fn, (zs,), order=1, modes=["rev"])
    grad = np.asarray(jax.grad(fn)(zs))
    h, num = 1e-6, np.zeros_like(zs)
    for idx in np.ndindex(*zs.shape):
      d = np.zeros_like(zs)
      d[idx] = h
      num[idx] = (ref_sinkhorn(zs + d, zt, 2.0, 0.2, 10, where)
                  - ref_sinkhorn(zs - d, zt, 2.0, 0.2, 10, where)) / (2 * h)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-8)
    assert np.all(grad[~where] == 0) and np.any(grad[where] != 0)
    g_t = jax.grad(lambda b: F.sinkhorn_loss(zs, b))(zt)
    assert np.all(np.asarray(g_t) == 0)


def test_sinkhorn_plan_marginals():
  w = np.abs(rand(0, 5, 5))
  n = 5
  plan = np.asarray(jax.jit(functools.partial(F.sinkhorn_plan, epsilon=0.5, iterations=100))(w))
  close(plan, ref_plan(np.float64(w), 0.5, 100))
  close(plan.sum(0), np.full(n, 1 / n))
  close(plan.sum(1), np.full(n, 1 / n))
  close(plan.sum(), 1.0)
  where = np.array([1, 1, 0, 1, 0], bool)
  plan = np.asarray(jax.jit(functools.partial(F.sinkhorn_plan, epsilon=0.5, iterations=100))(
      w, where=where))
  assert np.all(plan[~where] == 0) and np.all(plan[:, ~where] == 0)
  close(plan.sum(0)[where], np.full(3, 1 / 3))
  close(plan.sum(1)[where], np.full(3, 1 / 3))
  # Default SinKD settings on real SinKD costs: marginals already near uniform.
  zs, zt = rand(1, 8, 4), rand(2, 8, 4)
  ps, pt = np_softmax(zs / 2.0), np_softmax(zt / 2.0)
  cost = np.abs(ps[:, None] - pt[None]).sum(-1)
  plan = np.asarray(jax.jit(F.sinkhorn_plan)(cost))
  close(plan.sum(0), np.full(8, 1 / 8))
  np.testing.assert_allclose(plan.sum(1), np.full(8, 1 / 8), rtol=1e-2)


def test_sinkhorn_bf16_and_extreme_eps():
  zs, zt = 2 * rand(0, 6, 5), 2 * rand(1, 6, 5)
  zb, tb = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  out = jax.jit(F.sinkhorn_loss)(zb, tb)
  assert out.dtype == jnp.float32
  close(out, ref_sinkhorn(np.asarray(zb, np.float32), np.asarray(tb, np.float32)))
  close(out, ref_sinkhorn(zs, zt), rtol=3e-2)
  # exp(-W / eps) underflows float32 here; the log domain does not.
  out = jax.jit(functools.partial(F.sinkhorn_loss, epsilon=1e-3))(zs, zt)
  close(out, ref_sinkhorn(zs, zt, eps=1e-3), rtol=1e-4)
  finite_grad(lambda a: F.sinkhorn_loss(a, zt, epsilon=1e-3), zs)
  finite_grad(lambda a: F.sinkhorn_loss(a, a), zs)  # zero costs on the diagonal


def test_sinkhorn_errors():
  z = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r"must both be \[batch, classes\]"):
    F.sinkhorn_loss(z[0], z[0])
  with pytest.raises(ValueError, match="same shape"):
    F.sinkhorn_loss(z, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    F.sinkhorn_loss(z, z, temperature=0.0)
  with pytest.raises(ValueError, match=r"epsilon must be > 0 \(got -0.1\)"):
    F.sinkhorn_loss(z, z, epsilon=-0.1)
  with pytest.raises(ValueError, match="iterations must be >= 1"):
    F.sinkhorn_loss(z, z, iterations=0)
  with pytest.raises(TypeError, match="iterations must be a Python int"):
    F.sinkhorn_loss(z, z, iterations=2.5)
  with pytest.raises(ValueError, match=r"where has shape \(4,\)"):
    F.sinkhorn_loss(z, z, where=jnp.ones(4, bool))
  with pytest.raises(TypeError, match="student_logits must be a floating-point"):
    F.sinkhorn_loss(jnp.ones((3, 4), jnp.int32), z)
  with pytest.raises(ValueError, match=r"cost must be a square \[n, n\] matrix"):
    F.sinkhorn_plan(jnp.ones((3, 4)))
