"""The method leaderboard (bench/quality.py): its methods' configs, its statistics, and a smoke
run on configs/demo.py:tiny (2 methods x 2 seeds, 2 steps), resumed."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from jkd import losses
from jkd.data import model_spec
from jkd.train import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "quality.py")
DEMO = os.path.join(ROOT, "configs", "demo.py")


@pytest.fixture(scope="module")
def quality():
  spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_method_is_a_valid_config(quality):
  assert set(quality.METHODS) == {"ce_only", "forward_kl", "reverse_kl", "gjsd", "skew_kl",
                                  "akl", "taid", "gkd"}
  tokenizer = model_spec.char_tokenizer(128)
  for name in quality.METHODS:
    cfg = quality.run_config(DEMO, "tiny", name, 1, steps=3, at_start=False)
    quality._set_stop_ids(cfg, tokenizer)
    setup.check_config(cfg)
    objective = cfg.objective.to_dict()
    losses.build_objective(objective)  # Options checked.
    # One term, weight 1: the divergence alone (or cross-entropy alone for the baseline).
    (term,) = objective.values()
    assert term["weight"] == 1.0
    assert (term["term"] == "cross_entropy") == (name == "ce_only")
    assert cfg.data.seed == 1 and cfg.seed == 0  # A random teacher keeps its seed.
    assert cfg.eval.every == 3 and not cfg.eval.at_start and not cfg.report.enabled
    assert (cfg.onpolicy.mode if "onpolicy" in cfg else "") == ("gkd" if name == "gkd" else "")
    assert cfg.teacher.online  # The evaluation's KL needs it.
  taid = quality.run_config(DEMO, "tiny", "taid", 0, steps=7, at_start=True)
  assert taid.objective.kd.total_steps == 7 and taid.eval.at_start
  gkd = quality.run_config(DEMO, "tiny", "gkd", 0, steps=2, at_start=True)
  quality._set_stop_ids(gkd, tokenizer)
  assert (gkd.onpolicy.mode, gkd.onpolicy.eos_id, gkd.onpolicy.pad_id) == ("gkd", 1, 0)
  assert gkd.onpolicy.max_new_tokens == gkd.corpus.max_new_tokens


def test_statistics_and_verdict(quality):
  mean, std = quality.mean_std([1.0, 2.0, 4.0])
  assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(7 / 3))  # ddof=1
  assert math.isnan(quality.mean_std([1.0])[1])
  base = {"kl_forward": (2.0, 0.1), "top1_agreement": (0.5, 0.01)}
  kd = {"kl_forward": (1.5, 0.2), "top1_agreement": (0.51, 0.02)}
  kl = quality.verdict(kd, base, "kl_forward")  # margin 0.5 > 2 x max(0.2, 0.1)
  assert kl["ahead"] and kl["margin"] == pytest.approx(0.5) and kl["two_std"] == 0.4
  top1 = quality.verdict(kd, base, "top1_agreement")  # margin 0.01 < 0.04
  assert top1["ahead"] is False and top1["margin"] == pytest.approx(0.01)
  one_seed = quality.verdict({"kl_forward": (1.0, math.nan)}, base, "kl_forward")
  assert one_seed["ahead"] is None


def test_leaderboard_smoke_run_and_resume(quality, tmp_path):
  workdir, out = tmp_path / "work", tmp_path / "out" / "quality.md"
  args = ["--workdir", str(workdir), "--arg", "tiny", "--steps", "2", "--seeds", "2",
          "--methods", "ce_only,forward_kl", "--out", str(out)]
  # A process of its own: the bench turns on JAX's persistent compilation cache, process-wide.
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(out.with_suffix(".json").read_text())
  assert summary["steps"] == 2 and summary["seeds"] == 2
  assert list(summary["methods"]) == ["ce_only", "forward_kl"]
  for name, row in summary["methods"].items():
    assert row["seeds"] == [0, 1]
    for key in quality.METRICS:
      mean, std = row[key]
      assert math.isfinite(mean) and math.isfinite(std), (name, key)
  assert 0.0 <= summary["methods"]["forward_kl"]["rouge_l"][0] <= 1.0
  assert summary["init"]["kl_forward"] > 0  # The first run evaluated the student at step 0.
  assert set(summary["verdicts"]) == {"forward_kl"}
  assert set(summary["verdicts"]["forward_kl"]) == {"kl_forward", "top1_agreement"}
  assert len(summary["prompts"]) == len(summary["teacher_answers"]) == 2
  text = out.read_text()
  assert "| student at init |" in text and "| forward_kl |" in text
  assert "- forward_kl: ahead of CE only by > 2 std on KL: " in text
  # Every run shares the first run's corpus; finished runs keep no checkpoints.
  first = (workdir / "ce_only" / "seed0" / "data" / "corpus_eval" / "1.0.0" /
           "dataset_info.json").read_text()
  for run in ("ce_only/seed1", "forward_kl/seed0", "forward_kl/seed1"):
    assert (workdir / run / "data" / "corpus_eval" / "1.0.0" / "dataset_info.json"
            ).read_text() == first
    assert not (workdir / run / "checkpoints").exists()
  # A rerun finds every result and trains nothing.
  metrics = workdir / "forward_kl" / "seed1" / "metrics.jsonl"
  before = metrics.stat().st_mtime_ns
  again = quality.main(args)
  assert metrics.stat().st_mtime_ns == before
  assert list(again["methods"]["forward_kl"]["kl_forward"]) == summary["methods"][
      "forward_kl"]["kl_forward"]
