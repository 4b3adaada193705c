"""The run report (jkd.train.report) and the teacher-hacking monitor (jkd.train.monitor)."""

import json
import math
import os

import numpy as np
import pytest

from jkd.train import monitor
from jkd.train import report
from jkd.train.writer import METRICS_FILE


def _write_history(workdir, rows):
  with open(os.path.join(workdir, METRICS_FILE), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def _history(hack: bool):
  rows = []
  for step in range(1, 41):
    rows.append({"step": step, "loss/total": 3.0 * step ** -0.2, "loss/kd": 2.0 * step ** -0.2,
                 "perf/tokens_per_s": 100.0 + step, "perf/step_time_s": 1.0,
                 "perf/mfu": 0.1})
  for i, step in enumerate((0, 5, 10, 15, 20, 25, 30, 35, 40)):
    kl = 4.0 if step == 0 else 2.0 * step ** -0.3
    golden = 3.0 - 0.01 * i
    if hack and step >= 30:
      kl *= 0.5
      golden = 3.0 + 0.3 * (step - 25) / 5
    rows.append({"step": step, "eval/kl_forward": kl, "eval/student_nll": 2.0 + kl,
                 "eval/student_ppl": math.exp(2.0 + kl), "eval/top1_agreement": 0.5 + 0.01 * i,
                 "eval/student_ece": 0.1, "eval/teacher_nll": 1.9, "eval/teacher_ece": 0.05,
                 "golden/student_nll": golden})
  return rows


def test_power_law_fit_matches_numpy_least_squares():
  rng = np.random.default_rng(0)
  s = np.array([1.0, 3.0, 9.0, 20.0, 50.0])
  v = 5.0 * s ** -0.4 * np.exp(rng.normal(0, 0.05, s.size))
  a, b = monitor.fit_power_law(s, v)
  x = np.stack([np.ones_like(s), np.log(s)], 1)
  ref = np.linalg.lstsq(x, np.log(v), rcond=None)[0]
  np.testing.assert_allclose([a, b], ref, rtol=1e-10)


@pytest.mark.parametrize("hack", [False, True])
def test_assess_history_flags_only_the_hacked_run(hack):
  verdict = monitor.assess_history(_history(hack))
  assert verdict.flagged is hack
  assert verdict.diverging is hack
  if hack:
    assert verdict.first_step in (30, 35, 40)


def test_assess_rejects_bad_input():
  with pytest.raises(ValueError, match="one value per"):
    monitor.assess([1, 2], [1.0])
  with pytest.raises(ValueError, match="positive"):
    monitor.fit_power_law([0, 1], [1.0, 2.0])


def test_write_report(tmp_path):
  _write_history(tmp_path, _history(hack=True))
  paths = report.write_report(str(tmp_path), {
      "samples": [{"prompt": "Say hi.", "teacher": "Hi!", "student after": "Hi there"}],
      "timings": {"train_s": 12.5}})
  facts = json.load(open(paths["json"]))
  assert facts["before"]["step"] == 0 and facts["after"]["step"] == 40
  assert facts["before"]["kl_forward"] == 4.0
  assert facts["after"]["kl_forward"] == pytest.approx(0.5 * 2.0 * 40 ** -0.3)
  assert facts["teacher"]["teacher_nll"] == 1.9
  assert facts["throughput"]["tokens_per_s"] == pytest.approx(np.median(np.arange(101, 141)))
  assert facts["teacher_hacking"]["flagged"] is True
  md = open(paths["md"]).read()
  assert "FLAGGED" in md and "Say hi." in md and "| KL(teacher || student) |" in md
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report_needs_metrics(tmp_path):
  with pytest.raises(ValueError, match="no metrics"):
    report.write_report(str(tmp_path))


def test_the_loop_logs_the_verdict_after_each_evaluation(tmp_path, capsys):
  """The engine's monitor (jkd.train.monitor.HackingWatch) writes monitor/* metrics once a fit
  exists, and warns once when the hacked history flags; a resumed run reads the history back."""
  from jkd.train.writer import MetricsWriter, read_metrics
  evals = [r for r in _history(hack=True) if "eval/kl_forward" in r]
  writer = MetricsWriter(str(tmp_path), enabled=True)
  hacking = monitor.HackingWatch(str(tmp_path), writer, enabled=True)
  def evaluate(r):  # What the loop does after an evaluation.
    metrics = {k: v for k, v in r.items() if k != "step"}
    writer.write(r["step"], metrics)
    hacking.update(r["step"], metrics)

  for r in evals[:5]:  # steps 0..20: the fit needs more than 4 evaluations after step 0
    evaluate(r)
  writer.close()
  assert not [r for r in read_metrics(str(tmp_path)) if "monitor/flagged" in r]
  writer = MetricsWriter(str(tmp_path), start_step=20, enabled=True)  # a resumed run
  hacking = monitor.HackingWatch(str(tmp_path), writer, enabled=True)
  for r in evals[5:]:
    evaluate(r)
  writer.close()
  flags = {r["step"]: r["monitor/flagged"] for r in read_metrics(str(tmp_path))
           if "monitor/flagged" in r}
  assert flags == {25: 0.0, 30: 0.0, 35: 1.0, 40: 1.0}
  assert capsys.readouterr().err.count("possible teacher hacking") == 1
