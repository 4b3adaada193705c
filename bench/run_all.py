r"""Every benchmark of the project, one after the other, and one report of their tables.

    python bench/run_all.py                 # full sizes (about 75 minutes on a 2-core CPU)
    python bench/run_all.py --quick         # small shapes, minutes (a smoke run)
    python bench/run_all.py --only losses sampler
    python bench/run_all.py --collect       # only rebuild REPORT.md from bench/results/*.md

Runs, each in its own process (so one's memory and threads do not affect the next):

=============  ======================================================================
losses         fused vs unfused distillation loss: compiled memory and time
preference     fused vs unfused DPO log-probs: compiled memory and time
sampler        jkd.sampling vs transformers ``generate`` (needs torch)
train_step     a distillation step vs a plain PyTorch loop (needs torch)
train_step_bfloat16  the same step, both frameworks in bf16 mixed precision
quality        method leaderboard: 8 objectives x 3 seeds vs CE only on the demo corpus
\*_system_allocator  sampler and train_step with glibc's default allocator settings
=============  ======================================================================

and writes ``bench/results/REPORT.md``: the machine, then each benchmark's table (from its
``bench/results/<name>.md``), or the tail of its log when it failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _commands(quick: bool, workdir: str) -> dict[str, list[str]]:
  py = sys.executable
  res = lambda name: os.path.join(RESULTS, name)  # noqa: E731
  q = ["--quick"] if quick else []
  return {
      "losses": [py, os.path.join(HERE, "losses.py"), *q, "--json", res("losses.json")],
      "preference": [py, os.path.join(HERE, "preference.py"), *q],
      "sampler": [py, os.path.join(HERE, "sampler.py"), *q, "--out", res("sampler.md")],
      "train_step": [py, os.path.join(HERE, "train_step.py"), "--out", res("train_step.md"),
                     *(["--steps", "2", "--batch", "2", "--seq", "64"] if quick else [])],
      "train_step_bfloat16": [
          py, os.path.join(HERE, "train_step.py"), "--precision", "bfloat16",
          "--out", res("train_step_bfloat16.md"),
          *(["--steps", "2", "--batch", "2", "--seq", "64"] if quick else [])],
      # The same two with glibc's default allocator (for jkd and PyTorch alike): see
      # jkd.runtime.tune_host_allocator, which jkd's entry points and the two above apply.
      "sampler_system_allocator": [
          "env", "JKD_HOST_ALLOCATOR=system", py, os.path.join(HERE, "sampler.py"), *q,
          "--out", res("sampler_system_allocator.md")],
      "train_step_system_allocator": [
          "env", "JKD_HOST_ALLOCATOR=system", py, os.path.join(HERE, "train_step.py"),
          "--out", res("train_step_system_allocator.md"),
          *(["--steps", "2", "--batch", "2", "--seq", "64"] if quick else [])],
      "quality": [py, os.path.join(HERE, "quality.py"), "--workdir",
                  os.path.join(workdir, "quality"), "--out", res("quality.md"),
                  *(["--arg", "tiny"] if quick else [])],
  }


#: Benchmarks that print their table instead of writing it (captured to results/<name>.md).
_STDOUT_TABLES = ("losses", "preference")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", nargs="+", default=None)
  parser.add_argument("--workdir", default="/tmp/jkd_bench")
  parser.add_argument("--collect", action="store_true",
                      help="run nothing; assemble REPORT.md from the existing result files")
  args = parser.parse_args()
  commands = _commands(args.quick, args.workdir)
  names = args.only or list(commands)
  unknown = sorted(set(names) - set(commands))
  if unknown:
    parser.error(f"unknown benchmarks {unknown}; choose from {list(commands)}")
  os.makedirs(RESULTS, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  sections, status = [], {}
  for name in names:
    if args.collect:
      table = os.path.join(RESULTS, f"{name}.md")
      if os.path.exists(table):
        body = open(table).read().strip()
        sections.append("\n".join(("##" + line) if line.startswith("# ") else line
                                  for line in body.splitlines()))
      else:
        sections.append(f"## {name}: no result file (run `python bench/run_all.py --only {name}`)")
      continue
    print(f"== {name}: {' '.join(commands[name])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(commands[name], capture_output=True, text=True, cwd=os.path.dirname(HERE))
    seconds = time.perf_counter() - t0
    log = os.path.join(args.workdir, f"{name}.log")
    with open(log, "w") as f:
      f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    status[name] = proc.returncode
    if proc.returncode == 0 and name in _STDOUT_TABLES:
      with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write(proc.stdout)
    table = os.path.join(RESULTS, f"{name}.md")
    if proc.returncode == 0 and os.path.exists(table):
      body = open(table).read().strip()
      body = "\n".join(("##" + line) if line.startswith("# ") else line
                       for line in body.splitlines())
    else:
      body = (f"## {name}: FAILED (exit {proc.returncode})\n\n```\n"
              + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]) + "\n```")
    sections.append(body + f"\n\n({name}: {seconds:.0f} s; log {log})")
    print(f"   exit {proc.returncode} in {seconds:.0f} s", flush=True)
  header = [f"# jkd benchmark report{' (quick sizes)' if args.quick else ''}", "",
            "Assembled from the result files: each section states the machine and load of its"
            " own run." if args.collect else "",
            f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()};"
            f" Python {platform.python_version()}; load average at the end"
            f" {os.getloadavg()[0]:.1f}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            ""]
  with open(os.path.join(RESULTS, "REPORT.md"), "w") as f:
    f.write("\n\n".join(line for line in header if line) + "\n\n" + "\n\n".join(sections)
            + "\n")
  print(f"wrote {os.path.join(RESULTS, 'REPORT.md')}")
  sys.exit(1 if any(status.values()) else 0)


if __name__ == "__main__":
  main()
