"""A run's report: ``report.md``, ``report.json`` and ``curves.png`` in the workdir.

:func:`write_report` gathers what a reader of a distillation run asks first: held-out metrics
of the teacher and of the student before and after training (NLL, student-teacher KL, top-1
agreement, calibration), the curves of the losses and evaluations, the teacher-hacking verdict
(:mod:`jkd.train.monitor`), sample generations side by side, and throughput. Everything comes
from ``metrics.jsonl`` plus a ``summary`` dict of what the metrics file does not hold.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from jkd.train import monitor as monitor_lib
from jkd.train import storage
from jkd.train.writer import read_metrics

REPORT_MD, REPORT_JSON, CURVES_PNG = "report.md", "report.json", "curves.png"

#: Rows of the before/after table: (metric key without namespace, label, lower is better).
_ROWS = (("student_nll", "NLL (nats/token)", True), ("student_ppl", "perplexity", True),
         ("kl_forward", "KL(teacher || student)", True),
         ("top1_agreement", "top-1 agreement with teacher", False),
         ("student_accuracy", "top-1 accuracy (labels)", False),
         ("student_ece", "expected calibration error", True))


#: Metrics of a transformed teacher cache: FIRST's calibration, Swing's privacy cost.
_TARGET_FACTS = ("targets/", "privacy/")


def _evals(history: Sequence[Mapping], prefix: str) -> list[Mapping]:
  return [r for r in history if any(k.startswith(prefix) for k in r)]


def plot_curves(history: Sequence[Mapping], path: str, *, title: str = "") -> str:
  """Loss terms (left), held-out KL/NLL (middle) and top-1 agreement (right) against the step,
  as a PNG (matplotlib, no display needed)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  train = [r for r in history if "loss/total" in r]
  for key in sorted({k for r in train for k in r if k.startswith("loss/")}):
    pts = [(r["step"], r[key]) for r in train if key in r and math.isfinite(r[key])]
    if pts:
      axes[0].plot(*zip(*pts), label=key)
  axes[0].set(title="training losses", xlabel="step")
  for key, ax in (("eval/kl_forward", axes[1]), ("eval/student_nll", axes[1]),
                  ("golden/student_nll", axes[1]), ("eval/top1_agreement", axes[2])):
    pts = [(r["step"], r[key]) for r in history if key in r]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=key)
  for key, ax in (("eval/teacher_nll", axes[1]),):
    vals = [r[key] for r in history if key in r]
    if vals:
      ax.axhline(vals[-1], linestyle="--", color="gray", label=f"{key} (teacher)")
  axes[1].set(title="held-out", xlabel="step")
  axes[2].set(title="top-1 agreement", xlabel="step")
  for ax in axes:
    if ax.lines:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _fmt(x: Any) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def summarize(history: Sequence[Mapping]) -> dict[str, Any]:
  """The first and last evaluation (``before``/``after``), the teacher's metrics, the median
  throughput, and the teacher-hacking verdict, from ``metrics.jsonl`` lines."""
  evals = _evals(history, "eval/")
  out: dict[str, Any] = {}
  if evals:
    first, last = evals[0], evals[-1]
    out["before"] = {"step": first["step"], **{k[5:]: v for k, v in first.items()
                                               if k.startswith("eval/")}}
    out["after"] = {"step": last["step"], **{k[5:]: v for k, v in last.items()
                                             if k.startswith("eval/")}}
    out["teacher"] = {k[5:]: v for k, v in last.items() if k.startswith("eval/teacher_")}
  golden = _evals(history, "golden/")
  if golden:
    out["golden_before"] = {k[7:]: v for k, v in golden[0].items() if k.startswith("golden/")}
    out["golden_after"] = {k[7:]: v for k, v in golden[-1].items() if k.startswith("golden/")}
  perf = [r for r in history if "perf/tokens_per_s" in r]
  if perf:
    out["throughput"] = {k[5:]: float(np.median([r[k] for r in perf if k in r]))
                         for k in ("perf/tokens_per_s", "perf/step_time_s", "perf/mfu")}
  targets = [r for r in history if any(k.startswith(_TARGET_FACTS) for k in r)]
  if targets:  # A FIRST / Swing teacher cache (jkd.train.sources.cache_facts): per-run facts.
    out["teacher_targets"] = {k: v for k, v in targets[-1].items()
                              if k.startswith(_TARGET_FACTS)}
  verdict = monitor_lib.assess_history(history)
  if verdict is not None:
    out["teacher_hacking"] = verdict._asdict()
  return out


def write_report(workdir: str, summary: Mapping[str, Any] | None = None, *,
                 title: str = "jkd distillation run") -> dict[str, str]:
  """Writes ``report.md``, ``report.json`` and ``curves.png`` into ``workdir``.

  Args:
    workdir: the run's directory (its ``metrics.jsonl`` is read).
    summary: more facts to report: ``samples`` (a list of ``{"prompt", <model>: text, ...}``),
      ``timings`` (``{stage: seconds}``), ``data`` and ``models`` (free dicts), ``throughput``
      entries (e.g. the corpus generation's tokens/s); merged over :func:`summarize`'s.

  Returns:
    ``{"md": path, "json": path, "png": path}``.
  """
  history = read_metrics(workdir)
  if not history:
    raise ValueError(f"{workdir!r} has no metrics.jsonl lines: run training first.")
  facts = summarize(history)
  for key, value in (summary or {}).items():
    if isinstance(value, Mapping) and isinstance(facts.get(key), Mapping):
      facts[key] = {**facts[key], **value}
    else:
      facts[key] = value
  paths = {"md": storage.join(workdir, REPORT_MD), "json": storage.join(workdir, REPORT_JSON),
           "png": storage.join(workdir, CURVES_PNG)}
  if storage.is_remote(workdir):  # Drawn here, then uploaded.
    with tempfile.TemporaryDirectory() as tmp:
      local = plot_curves(history, os.path.join(tmp, CURVES_PNG), title=title)
      with open(local, "rb") as f:
        storage.write_bytes(paths["png"], f.read())
  else:
    plot_curves(history, paths["png"], title=title)
  storage.write_text(paths["json"], json.dumps(facts, indent=2, default=float) + "\n")
  storage.write_text(paths["md"], _markdown(facts, title))
  return paths


def _markdown(facts: Mapping[str, Any], title: str) -> str:
  lines = [f"# {title}", ""]
  for key in ("models", "data", "teacher_targets"):
    if facts.get(key):
      lines += [f"**{key}:** " + ", ".join(f"{k} = {_fmt(v)}" for k, v in facts[key].items()),
                ""]
  before, after = facts.get("before"), facts.get("after")
  if before and after:
    teacher = facts.get("teacher", {})
    lines += ["## Held-out teacher text", "",
              f"| metric | teacher | student before (step {before['step']}) |"
              f" student after (step {after['step']}) |", "|---|---|---|---|"]
    for key, label, _ in _ROWS:
      t = teacher.get(key.replace("student_", "teacher_")) if key.startswith("student_") else ""
      if key in before or key in after:
        lines.append(f"| {label} | {_fmt(t) if t != '' and t is not None else '-'} |"
                     f" {_fmt(before.get(key, '-'))} | {_fmt(after.get(key, '-'))} |")
    lines.append("")
  if facts.get("golden_before"):
    gb, ga = facts["golden_before"], facts["golden_after"]
    lines += ["## Golden reference (held-out human-written text)", "",
              "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(gb[k])} | {_fmt(ga.get(k, '-'))} |" for k in sorted(gb)]
    lines.append("")
  hacking = facts.get("teacher_hacking")
  if hacking:
    state = ("FLAGGED at step " + str(hacking["first_step"])) if hacking["flagged"] else "not flagged"
    fit = hacking.get("fit")
    fit_text = (f"power law fitted to the first evaluations: proxy = {math.exp(fit[0]):.3g} *"
                f" step^{fit[1]:.3f}" if fit else "too few evaluations for a power-law fit")
    lines += ["## Teacher-hacking monitor", "",
              f"{state}: proxy (eval/kl_forward) off its power-law fit: {hacking['off_fit']};"
              f" proxy improving while the golden metric (golden/student_nll) worsens:"
              f" {hacking['diverging']}. {fit_text}.", ""]
  lines += [f"![curves]({CURVES_PNG})", ""]
  if facts.get("throughput") or facts.get("timings"):
    lines += ["## Throughput and time", ""]
    for k, v in {**facts.get("throughput", {}), **facts.get("timings", {})}.items():
      if k == "mfu" and not v:
        continue  # No peak FLOP/s configured (train.peak_tflops_per_device = 0).
      lines.append(f"- {k}: {_fmt(v)}")
    lines.append("")
  samples = facts.get("samples") or []
  if samples:
    lines += ["## Samples (greedy, held-out prompts)", ""]
    for s in samples:
      lines += [f"**Prompt:** {s['prompt']}", ""]
      for who, text in s.items():
        if who != "prompt":
          quoted = "\n".join("> " + line for line in str(text).strip().splitlines()) or "> "
          lines += [f"*{who}:*", "", quoted, ""]
  return "\n".join(lines)
