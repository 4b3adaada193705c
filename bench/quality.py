"""Distillation vs a CE-only student: same teacher corpus, same student init, same steps.

    python bench/quality.py --workdir /tmp/jkd_quality                    # demo config
    python bench/quality.py --workdir /tmp/jkd_quality --corpus_from /tmp/jkd_demo --steps 100

Runs ``configs/demo.py`` twice through :func:`jkd.train.stages.run`: once with its objective
(generalized JSD to the online teacher + 0.1 CE) and once with cross-entropy only on the same
teacher-written text (sequence-level KD without the teacher's distributions). Both students
start from the same teacher layers and see the same batches; the table compares them on the
held-out teacher text (NLL, KL to the teacher, top-1 agreement, calibration) and on the golden
held-out human-written text. ``--corpus_from`` reuses the corpus of an earlier demo workdir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (("student_nll", "NLL on held-out teacher text"), ("kl_forward", "KL(teacher || student)"),
        ("top1_agreement", "top-1 agreement"), ("student_ece", "ECE"))


def _config(path: str, arg: str | None):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  parser.add_argument("--arg", default=None, help="config variant (e.g. tiny)")
  parser.add_argument("--steps", type=int, default=0, help="override train.steps")
  parser.add_argument("--corpus_from", default="", help="a demo workdir whose data/ to reuse")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.md"))
  args = parser.parse_args()
  from jkd.train import stages  # noqa: PLC0415

  runs = {}
  for name in ("distillation", "ce_only"):
    cfg = _config(args.config, args.arg)
    if args.steps:
      cfg.train.steps = args.steps
    if name == "ce_only":
      cfg.objective = {"ce": {"term": "cross_entropy", "weight": 1.0}}
    cfg.report.enabled = False
    workdir = os.path.join(args.workdir, name)
    source = args.corpus_from or (os.path.join(args.workdir, "distillation")
                                  if name == "ce_only" else "")
    if source and not os.path.exists(os.path.join(workdir, "data")):
      shutil.copytree(os.path.join(source, "data"), os.path.join(workdir, "data"))
    t0 = time.perf_counter()
    stages.run(cfg, workdir)
    seconds = time.perf_counter() - t0
    from jkd.train.report import summarize  # noqa: PLC0415
    from jkd.train.writer import read_metrics  # noqa: PLC0415
    facts = summarize(read_metrics(workdir))
    facts["seconds"] = seconds
    runs[name] = facts
    steps = cfg.train.steps

  d, c = runs["distillation"], runs["ce_only"]
  lines = [f"# Distillation vs CE-only: {os.path.basename(args.config)}"
           f"{':' + args.arg if args.arg else ''}, {steps} steps each, same corpus and init", "",
           "| metric | teacher | student at init | CE only | distillation (GJSD + 0.1 CE) |",
           "|---|---|---|---|---|"]
  for key, label in ROWS:
    teacher = d["teacher"].get(key.replace("student_", "teacher_"), "-") if key.startswith(
        "student_") else "-"
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines.append(f"| {label} | {fmt(teacher)} | {fmt(d['before'][key])} |"
                 f" {fmt(c['after'][key])} | {fmt(d['after'][key])} |")
  if "golden_after" in d:
    lines.append(f"| NLL on golden human text | {d['golden_after'].get('teacher_nll', 0):.4g} |"
                 f" {d['golden_before']['student_nll']:.4g} |"
                 f" {c['golden_after']['student_nll']:.4g} |"
                 f" {d['golden_after']['student_nll']:.4g} |")
  lines += ["", f"wall time: distillation {d['seconds']:.0f} s, CE only {c['seconds']:.0f} s"
            " (including corpus generation where it ran)"]
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump(runs, f, indent=2, default=float)


if __name__ == "__main__":
  main()
