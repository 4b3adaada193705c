"""FIRST's calibrated teacher targets (jkd.data.calibration, the cache's --calibrate) against an
independent float64 NumPy reference (docs/methods.md §15)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import models
from jkd.data import BatchSource, cache_targets
from jkd.data import calibration as cal
from jkd.data import open_split, read_metadata
from jkd.data import privacy
from jkd.data import teacher_cache as tc
from jkd.train import report
from jkd.train.sources import cache_facts

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2)
IGNORE = -100


# --- Float64 NumPy reference, from the formulas of docs/methods.md §15. --------------------------

def ref_renormalized(lp, t):
  """log( exp(a_i / T) / sum_j exp(a_j / T) ) over the k kept ids."""
  z = np.asarray(lp, np.float64) / t
  m = np.max(z, -1, keepdims=True)
  with np.errstate(invalid="ignore"):
    return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def ref_nll(lp, ids, labels, t):
  """-log p_T(label); +inf when the label is not among the ids."""
  logp = ref_renormalized(lp, t)
  hit = ids == labels[..., None]
  first = np.argmax(hit, -1)  # the label's place among the ids (ids are distinct)
  picked = -np.take_along_axis(logp, first[..., None], -1)[..., 0]
  return np.where(hit.any(-1), picked, np.inf)


def ref_ece(conf, correct, bins=15):
  """sum over bins (b/B, (b+1)/B] of |sum (correct - conf)|, over N."""
  conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
    total += abs(np.sum(correct[inside] - conf[inside]))
  return total / conf.size


def ref_topk_ece(lp, ids, labels, mask, t, renormalize=True):
  logp = ref_renormalized(lp, t) if renormalize else np.asarray(lp, np.float64)
  best = np.argmax(logp, -1)
  conf = np.exp(np.take_along_axis(logp, best[..., None], -1)[..., 0])
  pred = np.take_along_axis(ids, best[..., None], -1)[..., 0]
  return ref_ece(conf[mask], (pred == labels)[mask])


def ref_mean_nll(lp, ids, labels, mask, t):
  nll = ref_nll(lp, ids, labels, t)[mask]
  return float(np.mean(nll[np.isfinite(nll)]))


def topk_case(rng, n=300, vocab=12, k=4, scale=2.5, true_t=1.8):
  """Top-k of random teacher logits and labels drawn at temperature ``true_t``: the teacher is
  over-confident, so the fitted temperature is > 1."""
  z = rng.standard_normal((n, vocab)) * scale
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  p_true = np.exp(z / true_t) / np.exp(z / true_t).sum(-1, keepdims=True)
  labels = np.array([rng.choice(vocab, p=row) for row in p_true], np.int32)
  ids = np.argsort(-logp, -1)[:, :k].astype(np.int32)
  lp = np.take_along_axis(logp, ids, -1).astype(np.float32)
  mask = rng.random(n) < 0.9
  labels[rng.random(n) < 0.05] = IGNORE
  return lp, ids, labels, mask


# --- The pure functions. ------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.5, 1.0, 3.0])
def test_renormalize_and_nll_match_numpy(rng, t):
  lp, ids, labels, _ = topk_case(rng, n=40)
  lp[0, -1] = -np.inf  # a banned token among the k
  got = jax.jit(lambda a: cal.renormalize_topk(a, temperature=t))(lp)
  np.testing.assert_allclose(np.asarray(got), ref_renormalized(lp, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(got)).sum(-1), 1.0, rtol=1e-6)
  nll = np.asarray(jax.jit(lambda a, i, y: cal.topk_nll(a, i, y, temperature=t))(lp, ids,
                                                                                   labels))
  want = ref_nll(lp, ids, labels, t)
  assert np.array_equal(np.isinf(nll), np.isinf(want)) and np.isinf(want).any()
  np.testing.assert_allclose(nll[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-5)


@pytest.mark.parametrize("t", [0.7, 2.0])
def test_topk_ece_matches_numpy(rng, t):
  lp, ids, labels, mask = topk_case(rng)
  counted = mask & (labels != IGNORE)
  got = jax.jit(lambda a, i, y, w: cal.topk_ece(a, i, y, where=w, temperature=t))(
      lp, ids, labels, mask)
  np.testing.assert_allclose(float(got), ref_topk_ece(lp, ids, labels, counted, t), rtol=1e-5,
                             atol=1e-6)
  raw = cal.topk_ece(lp, ids, labels, where=mask, renormalize=False)
  np.testing.assert_allclose(float(raw), ref_topk_ece(lp, ids, labels, counted, 1.0, False),
                             rtol=1e-5, atol=1e-6)


def test_fitted_nll_temperature_minimises_the_reference_nll(rng):
  lp, ids, labels, mask = topk_case(rng, n=600)
  counted = mask & (labels != IGNORE)
  fit = cal.fit_temperature(lp, ids, labels, where=mask, criterion="nll")
  t = fit.temperature
  assert 1.05 < t < 20  # over-confident teacher: softened
  best = ref_mean_nll(lp, ids, labels, counted, t)
  for f in (0.99, 1.01, 0.9, 1.1):
    assert ref_mean_nll(lp, ids, labels, counted, t * f) > best, f
  # The minimiser of the float64 reference, by a fine scan refined by golden section.
  lo, hi = t * 0.8, t * 1.25
  g = (np.sqrt(5) - 1) / 2
  for _ in range(80):
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    if ref_mean_nll(lp, ids, labels, counted, a) < ref_mean_nll(lp, ids, labels, counted, b):
      hi = b
    else:
      lo = a
  np.testing.assert_allclose(t, 0.5 * (lo + hi), rtol=2e-4)
  np.testing.assert_allclose(fit.calibrated_nll, best, rtol=1e-5)
  np.testing.assert_allclose(fit.renormalized_nll,
                             ref_mean_nll(lp, ids, labels, counted, 1.0), rtol=1e-5)
  covered = np.isfinite(ref_nll(lp, ids, labels, 1.0))[counted]
  assert fit.positions == counted.sum() and fit.coverage == pytest.approx(covered.mean())


def test_fitted_ece_temperature_is_the_grid_minimum(rng):
  lp, ids, labels, mask = topk_case(rng, n=600)
  counted = mask & (labels != IGNORE)
  fit = cal.fit_temperature(lp, ids, labels, where=mask, criterion="ece", grid_size=61)
  grid = np.geomspace(0.05, 20.0, 61)
  eces = [ref_topk_ece(lp, ids, labels, counted, t) for t in grid]
  assert np.isclose(grid, fit.temperature, rtol=1e-6).any()
  assert ref_topk_ece(lp, ids, labels, counted, fit.temperature) <= min(eces) + 1e-5
  assert fit.calibrated_ece < fit.renormalized_ece  # the renormalised top-k is over-confident
  np.testing.assert_allclose(fit.calibrated_ece,
                             ref_topk_ece(lp, ids, labels, counted, fit.temperature), atol=1e-5)
  np.testing.assert_allclose(fit.teacher_ece,
                             ref_topk_ece(lp, ids, labels, counted, 1.0, False), atol=1e-5)


def test_bad_inputs_are_clear_errors(rng):
  lp, ids, labels, mask = topk_case(rng, n=20)
  with pytest.raises(ValueError, match="k >= 1"):
    cal.renormalize_topk(np.zeros((3, 0), np.float32))
  with pytest.raises(ValueError, match="k >= 1"):
    cal.fit_temperature(np.zeros((3, 0)), np.zeros((3, 0), int), np.zeros(3, int))
  with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
    cal.renormalize_topk(lp, temperature=0.0)
  with pytest.raises(ValueError, match="criterion must be one of"):
    cal.fit_temperature(lp, ids, labels, criterion="brier")
  with pytest.raises(ValueError, match="0 < min_temperature < max_temperature"):
    cal.fit_temperature(lp, ids, labels, min_temperature=2.0, max_temperature=1.0)
  with pytest.raises(ValueError, match="ids have shape"):
    cal.topk_nll(lp, ids[:, :2], labels)
  with pytest.raises(ValueError, match="no counted position"):
    cal.fit_temperature(lp, ids, np.full_like(labels, IGNORE))
  with pytest.raises(ValueError, match="no held-out label is among the teacher's top-k"):
    cal.fit_temperature(lp, ids, np.full_like(labels, 99), criterion="nll")
  with pytest.raises(ValueError, match="renormalize=False"):
    cal.topk_ece(lp, ids, labels, renormalize=False, temperature=2.0)


# --- The cache (CLI) and what the run reports. ---------------------------------------------------

@pytest.fixture(scope="module")
def first_cache(tmp_path_factory):
  """A FIRST cache of a random teacher written by the CLI: train and held-out .npz files."""
  tmp = tmp_path_factory.mktemp("first")
  rng = np.random.default_rng(7)
  ex = {"tokens": rng.integers(0, 128, (6, 8)).astype(np.int32),
        "labels": rng.integers(0, 128, (6, 8)).astype(np.int32),
        "loss_mask": np.ones((6, 8), bool)}
  np.savez(tmp / "train.npz", **{k: v[:4] for k, v in ex.items()})
  np.savez(tmp / "held.npz", **{k: v[4:] for k, v in ex.items()})
  spec = "random:" + json.dumps(dict(TINY, seed=5))
  base = ["--teacher", spec, "--dataset", str(tmp / "train.npz"), "--k", "3", "--out",
          str(tmp / "out"), "--batch_size", "4", "--no_progress"]
  path = tc.main(base + ["--calibrate", "--calibration_dataset", str(tmp / "held.npz"),
                         "--calibration_criterion", "nll", "--eval_split", "eval",
                         "--eval_dataset", str(tmp / "held.npz")])
  return tmp, base, path, ex


def _teacher_logp(tokens):
  config = models.ModelConfig(**TINY)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(5))
  z = np.asarray(jax.jit(lambda p, x: models.apply(p, x, config=config).logits)(
      params, jnp.asarray(tokens)), np.float64)
  return z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1,
                                                                                   keepdims=True))


def test_calibrated_cache_holds_the_renormalised_tempered_topk(first_cache):
  tmp, base, path, ex = first_cache
  meta = read_metadata(path)
  c = meta["calibration"]
  assert c["method"] == "FIRST" and c["criterion"] == "nll" and c["positions"] == 16
  assert meta["temperature"] == c["temperature"] and meta["splits"] == ["eval", "train"]
  assert meta["count"] == 4 and meta["eval_count"] == 2
  logp = _teacher_logp(ex["tokens"])
  # The temperature is fitted on the held-out examples' top-3 (float64 reference NLL).
  held = np.argsort(-logp[4:], -1)[..., :3]
  held_lp = np.take_along_axis(logp[4:], held, -1)
  t = c["temperature"]
  best = ref_mean_nll(held_lp, held, ex["labels"][4:], np.ones((2, 8), bool), t)
  if 0.05 < t < 20:
    for f in (0.98, 1.02):
      assert ref_mean_nll(held_lp, held, ex["labels"][4:], np.ones((2, 8), bool), t * f) > best
  src = open_split(path, "train")
  got_ids = np.stack([src[i]["teacher_topk_ids"] for i in range(4)]).astype(np.int64)
  got_lp = np.stack([src[i]["teacher_topk_logprobs"] for i in range(4)]).astype(np.float64)
  tail = np.stack([src[i]["teacher_tail_logprob"] for i in range(4)])
  ids = np.argsort(-logp[:4], -1)[..., :3]
  np.testing.assert_array_equal(got_ids, ids)
  want = ref_renormalized(np.take_along_axis(logp[:4], ids, -1), t)
  np.testing.assert_allclose(got_lp, want, atol=2e-3)  # float16 storage
  assert np.all(tail == tc.TAIL_FLOOR)
  assert len(open_split(path, "eval")) == 2


def test_held_out_means_held_out_and_one_method_per_cache(first_cache, tmp_path):
  tmp, base, _, ex = first_cache
  with pytest.raises(SystemExit):  # argparse's error: calibrating on the cached data
    tc.main(base[:-3] + [str(tmp_path / "o"), "--calibrate"])
  config = models.ModelConfig(**TINY)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(5))
  with pytest.raises(ValueError, match="calibrate_on \\(FIRST\\) or privacy \\(Swing\\)"):
    tc.write_teacher_cache(ex, str(tmp_path), params=params, config=config, k=3,
                           calibrate_on=ex, privacy=privacy.PrivacySpec(epsilon=1.0))


def test_the_run_reports_the_calibration(first_cache):
  _, _, path, _ = first_cache
  meta = read_metadata(path)
  facts = cache_targets.facts(meta)
  assert facts["targets/temperature"] == meta["temperature"]
  assert facts["targets/calibrated_ece"] == meta["calibration"]["calibrated_ece"]

  class Rows(BatchSource):
    def __next__(self):
      return {"tokens": np.zeros((3, 8), np.int32)}

    def get_state(self):
      return 0

  source = cache_facts.with_cache_facts(Rows(), path)
  batch = next(source)
  np.testing.assert_allclose(batch["metric/targets/temperature"],
                             np.full(3, meta["temperature"], np.float32))
  assert source.get_state() == 0 and source.inner is not None
  history = [{"step": 1, "loss/total": 1.0, **{k: float(np.float32(v)) for k, v in facts.items()}},
             {"step": 1, "eval/student_ece": 0.1, "eval/student_accuracy": 0.4,
              "eval/student_nll": 2.0}]
  summary = report.summarize(history)
  assert summary["teacher_targets"]["targets/temperature"] == pytest.approx(meta["temperature"])
  assert summary["after"]["student_accuracy"] == 0.4
