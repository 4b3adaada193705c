"""Swing's private teacher targets (jkd.data.privacy, the cache's --privacy_*) against
independent float64 references of the Gaussian mechanism (docs/methods.md §16)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import models
from jkd.data import cache_targets
from jkd.data import open_split, read_metadata
from jkd.data import privacy as dp
from jkd.data import teacher_cache as tc

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2)


# --- Float64 references, from the formulas (Dwork & Roth Thm A.1; Balle & Wang 2018 Thm 8). ----

def ref_phi(x):
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


def ref_delta(eps, sigma, sens):
  """Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D)."""
  second = ref_phi(-sens / (2 * sigma) - eps * sigma / sens)
  second = math.exp(eps + math.log(second)) if second > 0 else 0.0  # e^eps may overflow alone
  return ref_phi(sens / (2 * sigma) - eps * sigma / sens) - second


# --- Calibration of sigma. ----------------------------------------------------------------------

@pytest.mark.parametrize("eps,delta,sens", [(0.1, 1e-5, 1.0), (0.9, 1e-6, 2.5),
                                            (0.5, 1e-3, 0.3)])
def test_classic_sigma_is_the_formula_and_satisfies_the_exact_bound(eps, delta, sens):
  sigma = dp.gaussian_sigma(eps, delta, sensitivity=sens)
  assert sigma == pytest.approx(sens * math.sqrt(2 * math.log(1.25 / delta)) / eps, rel=1e-12)
  assert ref_delta(eps, sigma, sens) <= delta  # the classic bound is valid ...
  assert dp.analytic_gaussian_sigma(eps, delta, sensitivity=sens) < sigma  # ... and loose


@pytest.mark.parametrize("eps,delta,sens", [(0.1, 1e-5, 1.0), (1.0, 1e-5, 1.0),
                                            (8.0, 1e-5, math.sqrt(2) * 4), (3.0, 1e-2, 0.5),
                                            (20.0, 1e-8, 1.0)])
def test_analytic_sigma_meets_delta_tightly(eps, delta, sens):
  sigma = dp.analytic_gaussian_sigma(eps, delta, sensitivity=sens)
  assert ref_delta(eps, sigma, sens) <= delta * (1 + 1e-9)
  assert ref_delta(eps, sigma * (1 - 1e-6), sens) > delta  # any less noise breaks it
  assert dp.analytic_gaussian_delta(eps, sigma, sensitivity=sens) == pytest.approx(
      ref_delta(eps, sigma, sens), rel=1e-6, abs=1e-15)
  # sigma scales with the sensitivity; epsilon is its inverse in epsilon.
  assert sigma == pytest.approx(sens * dp.analytic_gaussian_sigma(eps, delta), rel=1e-9)
  assert dp.analytic_gaussian_epsilon(sigma, delta, sensitivity=sens) == pytest.approx(eps,
                                                                                       rel=1e-6)


def test_plan_composes_the_positions_of_a_sequence():
  spec = dp.PrivacySpec(epsilon=4.0, delta=1e-6, clip=0.5)
  plan = spec.plan(9)
  per_position = math.sqrt(2) * 0.5  # non-negative vectors of norm <= 0.5
  assert plan["sensitivity"] == pytest.approx(per_position * 3)
  assert plan["sigma"] == pytest.approx(
      dp.analytic_gaussian_sigma(4.0, 1e-6, sensitivity=per_position * 3))
  assert ref_delta(4.0, plan["sigma"], per_position * 3) <= 1e-6
  assert plan["epsilon_sequence"] == pytest.approx(4.0, rel=1e-6)
  assert plan["epsilon_position"] < 4.0 / 2  # one position costs much less
  by_position = dp.PrivacySpec(epsilon=4.0, delta=1e-6, clip=0.5, unit="position").plan(9)
  assert by_position["sigma"] == pytest.approx(plan["sigma"] / 3)
  assert by_position["epsilon_position"] == pytest.approx(4.0, rel=1e-6)
  assert ref_delta(by_position["epsilon_sequence"], by_position["sigma"],
                   per_position * 3) == pytest.approx(1e-6, rel=1e-4)
  classic = dp.PrivacySpec(epsilon=0.5, delta=1e-5, mechanism="gaussian").plan(4)
  assert classic["sigma"] == pytest.approx(dp.gaussian_sigma(0.5, 1e-5,
                                                             sensitivity=math.sqrt(2) * 2))


# --- The release. -------------------------------------------------------------------------------

def test_noise_std_is_sigma_and_clipping_bounds_the_norm(rng):
  sigma, clip = 0.37, 0.6
  z = rng.standard_normal((64, 32)) * 3
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  clipped = np.asarray(jax.jit(lambda x: dp.clip_l2(x, clip))(p), np.float64)
  norms = np.linalg.norm(p, axis=-1)
  want = p * np.minimum(1.0, clip / norms)[:, None]  # float64 reference
  np.testing.assert_allclose(clipped, want, rtol=1e-5, atol=1e-7)
  assert np.all(np.linalg.norm(clipped, axis=-1) <= clip * (1 + 1e-6))
  assert np.any(norms > clip) and np.any(norms < clip)  # both cases seen
  # Any two clipped distributions are within sqrt(2) min(C, 1); point masses reach it.
  dist = np.linalg.norm(clipped[:, None] - clipped[None], axis=-1)
  assert dist.max() <= dp.distribution_sensitivity(clip) * (1 + 1e-6)
  masses = np.asarray(dp.clip_l2(np.eye(2), clip))
  assert np.linalg.norm(masses[0] - masses[1]) == pytest.approx(dp.distribution_sensitivity(clip))
  noisy = jax.jit(lambda x, k: dp.add_gaussian_noise(x, k, sigma=sigma))(
      jnp.zeros((400, 500)), jax.random.key(1))
  noise = np.asarray(noisy, np.float64)
  assert noise.std() == pytest.approx(sigma, rel=0.01) and abs(noise.mean()) < 3 * sigma / 447


def test_noisy_topk_matches_numpy(rng):
  noisy = rng.standard_normal((5, 7, 20)).astype(np.float32)
  noisy[0, 0] = -np.abs(noisy[0, 0])  # no positive entry: uniform over the k
  k = 4
  ids, lp, tail = jax.jit(lambda v: dp.noisy_topk(v, k))(noisy)
  want_ids = np.argsort(-noisy, -1, kind="stable")[..., :k]
  np.testing.assert_array_equal(np.asarray(ids), want_ids)
  top = np.maximum(np.take_along_axis(noisy.astype(np.float64), want_ids, -1), 0)
  total = top.sum(-1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    want = np.where(total > 0, np.log(top / total), -np.log(k))
  np.testing.assert_allclose(np.asarray(lp), np.maximum(want, dp.LOG_FLOOR), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(lp[0, 0])), 1 / k, rtol=1e-6)
  assert np.all(np.asarray(tail) == dp.LOG_FLOOR) and dp.LOG_FLOOR == tc.TAIL_FLOOR


def test_bad_values_are_clear_errors():
  for eps in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="epsilon must be"):
      dp.PrivacySpec(epsilon=eps)
    with pytest.raises(ValueError, match="epsilon must be"):
      dp.analytic_gaussian_sigma(eps, 1e-5)
  for delta in (0.0, 1.0, -0.1, 2.0):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
      dp.PrivacySpec(epsilon=1.0, delta=delta)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
      dp.gaussian_sigma(0.5, delta)
  for clip in (0.0, -1.0):
    with pytest.raises(ValueError, match="clip must be > 0"):
      dp.PrivacySpec(epsilon=1.0, clip=clip)
    with pytest.raises(ValueError, match="clip must be > 0"):
      dp.clip_l2(np.ones(3), clip)
  for k in (0, -1, 21, 2.5):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, vocab=20\]"):
      dp.noisy_topk(np.ones(20), k)
  with pytest.raises(ValueError, match="use the analytic Gaussian mechanism"):
    dp.gaussian_sigma(1.0, 1e-5)
  with pytest.raises(ValueError, match="needs epsilon < 1"):
    dp.PrivacySpec(epsilon=2.0, mechanism="gaussian")
  with pytest.raises(ValueError, match="mechanism must be one of"):
    dp.PrivacySpec(epsilon=1.0, mechanism="laplace")
  with pytest.raises(ValueError, match="unit must be one of"):
    dp.PrivacySpec(epsilon=1.0, unit="token")
  with pytest.raises(ValueError, match="positions must be an int >= 1"):
    dp.PrivacySpec(epsilon=1.0).plan(0)


# --- The cache (CLI). ---------------------------------------------------------------------------

def test_private_cache_is_the_noisy_topk_at_the_planned_sigma(rng, tmp_path, capsys,
                                                               monkeypatch):
  seen = {"sigma": []}
  release = cache_targets.private_teacher_topk

  def spy(*args, **kwargs):  # the sigma each batch is noised with
    seen["sigma"].append(np.float32(args[6]))
    return release(*args, **kwargs)

  monkeypatch.setattr(cache_targets, "private_teacher_topk", spy)
  ex = {"tokens": rng.integers(0, 128, (3, 8)).astype(np.int32),
        "labels": rng.integers(0, 128, (3, 8)).astype(np.int32),
        "loss_mask": np.ones((3, 8), bool)}
  np.savez(tmp_path / "train.npz", **ex)
  spec = "random:" + json.dumps(dict(TINY, seed=2))
  path = tc.main(["--teacher", spec, "--dataset", str(tmp_path / "train.npz"), "--k", "6",
                  "--out", str(tmp_path / "out"), "--batch_size", "3", "--no_progress",
                  "--privacy_epsilon", "2", "--privacy_delta", "1e-6", "--privacy_clip", "0.8",
                  "--privacy_seed", "11"])
  assert "Swing: (epsilon=2, delta=1e-06)-DP per sequence" in capsys.readouterr().out
  plan = read_metadata(path)["privacy"]
  assert seen["sigma"] == [np.float32(plan["sigma"])]  # the one batch noised at the plan's
  sens = math.sqrt(2) * 0.8 * math.sqrt(8)  # 8 positions per sequence
  assert plan["sensitivity"] == pytest.approx(sens) and plan["positions"] == 8
  assert ref_delta(2.0, plan["sigma"], sens) <= 1e-6 < ref_delta(2.0, plan["sigma"] * 0.999,
                                                                 sens)
  assert plan["noise_seed"].startswith("fixed") and plan["unit"] == "sequence"
  # Rebuild the release: the teacher's distribution, clipped, plus the noise of batch 0.
  config = models.ModelConfig(**TINY)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(2))
  z = np.asarray(jax.jit(lambda p, x: models.apply(p, x, config=config).logits)(
      params, jnp.asarray(ex["tokens"])), np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  clipped = p * np.minimum(1.0, 0.8 / np.linalg.norm(p, axis=-1, keepdims=True))
  noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(11), 0), p.shape,
                                       jnp.float32), np.float64)
  noisy = clipped + plan["sigma"] * noise
  src = open_split(path, "train")
  got_ids = np.stack([src[i]["teacher_topk_ids"] for i in range(3)]).astype(np.int64)
  got_lp = np.stack([src[i]["teacher_topk_logprobs"] for i in range(3)]).astype(np.float64)
  order = np.argsort(-noisy, -1)
  gap = (np.take_along_axis(noisy, order[..., 5:6], -1)
         - np.take_along_axis(noisy, order[..., 6:7], -1))[..., 0]
  clear = gap > 1e-4  # (ties at the 6th place are float32 noise)
  np.testing.assert_array_equal(got_ids[clear], order[..., :6][clear])

  def released(sigma):
    top = np.maximum(np.take_along_axis(clipped + sigma * noise, got_ids, -1), 0)
    with np.errstate(divide="ignore"):
      return np.maximum(np.log(top / top.sum(-1, keepdims=True)), tc.TAIL_FLOOR)

  np.testing.assert_allclose(got_lp, released(plan["sigma"]), atol=5e-3)  # float16 storage
