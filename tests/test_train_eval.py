"""jkd.train.evaluate against an independent float64 NumPy reference (under jax.jit)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from jkd import models
from jkd.train import evaluate as ev

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
IGNORE = -100


# --- NumPy reference, from the definitions in the module docstring. -------------------------

def ece_reference(logits, labels, mask, bins=15):
  p = ref.softmax(logits)
  conf, pred = p.max(-1)[mask], logits.argmax(-1)[mask]
  correct = (pred == labels[mask]).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  total = 0.0
  for lo, hi in zip(edges[:-1], edges[1:]):
    inside = (conf > lo) & (conf <= hi)
    if inside.any():  # |acc_b - conf_b| weighted by the bin's share of the positions
      total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
  return total


def metrics_reference(zs, zt, labels, where=None):
  zs, zt = ref.f64(zs), ref.f64(zt)
  mask = labels != IGNORE
  if where is not None:
    mask &= where
  safe = np.where(mask, labels, 0)
  out = {"eval/tokens": float(mask.sum())}
  for name, z in (("student", zs), ("teacher", zt)):
    if z is None:
      continue
    logp = ref.log_softmax(z)
    nll = -np.take_along_axis(logp, safe[..., None], -1)[..., 0][mask].mean()
    out[f"eval/{name}_nll"] = nll
    out[f"eval/{name}_ppl"] = np.exp(nll) if nll < 700 else np.inf
    out[f"eval/{name}_ece"] = ece_reference(z, labels, mask)
    out[f"eval/{name}_accuracy"] = (z.argmax(-1) == labels)[mask].mean()
  lp, lq = ref.log_softmax(zt), ref.log_softmax(zs)
  p = np.exp(lp)
  with np.errstate(invalid="ignore"):  # 0 * log 0 = 0 at tokens the teacher bans
    out["eval/kl_forward"] = (p * np.where(p > 0, lp - lq, 0)).sum(-1)[mask].mean()
  out["eval/top1_agreement"] = (zs.argmax(-1) == zt.argmax(-1))[mask].mean()
  return out


def random_case(rng, shape=(3, 7, 13), scale=3.0):
  zs = (rng.standard_normal(shape) * scale).astype(np.float32)
  zt = (rng.standard_normal(shape) * scale).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  labels[rng.random(shape[:-1]) < 0.2] = IGNORE
  where = rng.random(shape[:-1]) < 0.8
  return zs, zt, labels, where


def run(zs, zt, labels, where=None):
  fn = jit(lambda a, b, y, w: ev.eval_sums(a, y, teacher_logits=b, where=w))
  return ev.eval_metrics(jax.device_get(fn(zs, zt, labels, where)))


def assert_metrics_close(got, want, rtol=1e-5, atol=1e-6):
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)


# --- Tests. ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_metrics_match_numpy(rng, scale):
  zs, zt, labels, where = random_case(rng, scale=scale)
  got = run(zs, zt, labels, where)
  assert_metrics_close(got, metrics_reference(zs, zt, labels, where))
  assert sorted(got) == sorted(ev.METRIC_NAMES)


def test_sums_add_up_across_batches(rng):
  zs, zt, labels, where = random_case(rng, shape=(4, 6, 9))
  fn = jit(lambda a, b, y, w: ev.eval_sums(a, y, teacher_logits=b, where=w))
  halves = [jax.device_get(fn(zs[s], zt[s], labels[s], where[s]))
            for s in (slice(0, 2), slice(2, 4))]
  summed = jax.tree.map(np.add, *halves)
  assert_metrics_close(ev.eval_metrics(summed), metrics_reference(zs, zt, labels, where))


def test_mask_equivalence(rng):
  """Masked positions do not count: f(x, where=m) equals f on the kept rows only."""
  zs, zt, labels, where = random_case(rng, shape=(2, 10, 7))
  keep = where & (labels != IGNORE)
  flat = lambda x: x[keep][None]  # noqa: E731  [1, kept, ...]
  assert_metrics_close(run(zs, zt, labels, where),
                       run(flat(zs), flat(zt), flat(labels), None))


def test_student_only_and_known_values():
  # Uniform student over 4 tokens: NLL log 4, confidence 1/4 in bin 4 (0.2, 0.2667], never
  # correct under argmax ties (argmax 0, label 1): ECE = 0.25.
  z = np.zeros((1, 2, 4), np.float32)
  sums = jit(lambda a, y: ev.eval_sums(a, y))(z, np.array([[1, IGNORE]], np.int32))
  m = ev.eval_metrics(jax.device_get(sums))
  assert sorted(m) == ["eval/student_accuracy", "eval/student_ece", "eval/student_nll",
                       "eval/student_ppl", "eval/tokens"]
  assert m["eval/student_accuracy"] == 0.0  # argmax 0, label 1
  np.testing.assert_allclose([m["eval/student_nll"], m["eval/student_ppl"],
                              m["eval/student_ece"]], [math.log(4), 4.0, 0.25], rtol=1e-6)
  assert np.asarray(sums["student_bin_count"]).tolist()[3] == 1.0


def test_extreme_and_banned_logits(rng):
  zs, zt, labels, where = random_case(rng, shape=(2, 5, 9), scale=1e4)
  zt[..., 0] = -np.inf  # a token the teacher bans
  zs[..., 0] = -np.inf
  labels[labels == 0] = 1
  got = run(zs, zt, labels, where)
  assert all(np.isfinite(v) for k, v in got.items() if not k.endswith("_ppl"))  # exp(~1e4)
  want = metrics_reference(zs, zt, labels, where)
  # Huge logits: float32 NLL/KL are exact only up to ~1e4 * eps(f32) relative to the logits.
  assert_metrics_close(got, want, rtol=1e-3, atol=1e-2)


def test_bf16_inputs(rng):
  zs, zt, labels, where = random_case(rng)
  to_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
  got = run(to_bf16(zs), to_bf16(zt), labels, where)
  want = metrics_reference(np.asarray(to_bf16(zs), np.float32),
                           np.asarray(to_bf16(zt), np.float32), labels, where)
  assert_metrics_close(got, want, rtol=1e-5, atol=1e-5)


def test_no_counted_positions_is_an_error():
  sums = ev.eval_sums(jnp.zeros((1, 2, 3)), jnp.full((1, 2), IGNORE))
  with pytest.raises(ValueError, match="no counted positions"):
    ev.eval_metrics(jax.device_get(sums))


def test_runner_on_tiny_models(rng):
  teacher_cfg = models.ModelConfig(vocab_size=17, hidden_size=16, intermediate_size=24,
                                   num_layers=2, num_heads=2, num_kv_heads=1)
  student_cfg = teacher_cfg.replace(num_layers=1)
  init = jit(models.init_params, static_argnums=0)
  tp, sp = init(teacher_cfg, jax.random.key(0)), init(student_cfg, jax.random.key(1))
  batches = [{"tokens": rng.integers(0, 17, (2, 6)).astype(np.int32),
              "labels": rng.integers(0, 17, (2, 6)).astype(np.int32),
              "loss_mask": rng.random((2, 6)) < 0.7} for _ in range(3)]
  step = jit(ev.make_eval_step(student_config=student_cfg, teacher_config=teacher_cfg))
  got = ev.evaluate_batches(step, sp, tp, batches)
  apply = jit(lambda p, t, c: models.apply(p, t, config=c).logits, static_argnums=2)
  logits = lambda p, c, b: np.asarray(apply(p, b["tokens"], c))  # noqa: E731
  cat = lambda f: np.concatenate([f(b) for b in batches])  # noqa: E731
  want = metrics_reference(cat(lambda b: logits(sp, student_cfg, b)),
                           cat(lambda b: logits(tp, teacher_cfg, b)),
                           cat(lambda b: b["labels"]), cat(lambda b: b["loss_mask"]))
  assert_metrics_close(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="no batches"):
    ev.evaluate_batches(step, sp, tp, [])
