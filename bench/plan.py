"""The pod recipes planned with the TPU compiler: memory per chip, roofline, before and after.

    python bench/plan.py                     # every row below, ~10-20 min on 2 cores
    python bench/plan.py --rows 8b_1b,8b_1b_fused --out /tmp/plan.md
    python bench/plan.py --rows qwen3_8b_1.7b_gkd --update   # redo rows, keep the others

Needs libtpu (``pip install "jax[tpu]==<jax version>"``); no TPU. Each row is
``jkd.plan.plan(config, topology)``: the engine's train step lowered from shapes and compiled by
libtpu's compiler for the slice, its ``memory_analysis()`` per chip. Rows compile one after
another in this process (libtpu admits one process at a time). ``no constraints`` rows
compile the step as jkd did before activation sharding constraints (``jkd.partitioning``'s
context disabled), which reproduces the memory the constraints fix. Writes
``bench/results/plan.md`` and ``plan.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import time

import jax

from jkd import partitioning
from jkd import plan as plan_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(name: str, variant: str | None):
  """``configs/<name>.py``'s ``get_config(variant)``."""
  path = os.path.join(HERE, "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"jkd_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)

#: name -> (config, variant, topology, overrides, constraints on).
ROWS = {
    "8b_1b_before": ("llama8b_to_1b", None, "v5e-16", {}, False),
    "8b_1b": ("llama8b_to_1b", None, "v5e-16", {}, True),
    "8b_1b_fused": ("llama8b_to_1b", "fused", "v5e-16", {}, True),
    "8b_1b_4x4": ("llama8b_to_1b", None, "v5e-16", {"mesh.shape": (1, 4, 4)}, True),
    "8b_1b_4x4_fused": ("llama8b_to_1b", "fused", "v5e-16", {"mesh.shape": (1, 4, 4)}, True),
    "8b_1b_b64": ("llama8b_to_1b", None, "v5e-16", {"data.batch_size": 64}, True),
    "8b_1b_b64_accum4": ("llama8b_to_1b", None, "v5e-16",
                         {"data.batch_size": 64, "train.grad_accum": 4}, True),
    "8b_1b_b64_fused": ("llama8b_to_1b", "fused", "v5e-16", {"data.batch_size": 64}, True),
    "8b_1b_b64_fused_accum4": ("llama8b_to_1b", "fused", "v5e-16",
                               {"data.batch_size": 64, "train.grad_accum": 4}, True),
    "qwen3_8b_1.7b_gkd": ("qwen3_8b_gkd", None, "v5e-16", {}, True),
    "qwen3_8b_0.6b_gkd": ("qwen3_8b_gkd", "0.6b", "v5e-16", {}, True),
    "70b_8b_cache": ("llama70b_to_8b_cache", None, "v5p-64", {}, True),
    "dpo_8b_ref_70b": ("dpo_llama8b", None, "v5p-64", {}, True),
}


@contextlib.contextmanager
def constraints(on: bool):
  """The activation sharding constraints as the engine has them, or switched off."""
  if on:
    yield
    return
  saved = partitioning.activation_sharding
  partitioning.activation_sharding = lambda mesh, rules: contextlib.nullcontext()
  try:
    yield
  finally:
    partitioning.activation_sharding = saved


def run_row(name: str) -> dict:
  config_name, variant, topology, overrides, on = ROWS[name]
  cfg = load_config(config_name, variant)
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    cfg[section][key] = value
  start = time.perf_counter()
  with constraints(on):
    report = plan_lib.plan(cfg, topology)
  report.update(row=name, config=f"{config_name}{':' + variant if variant else ''}",
                overrides={k: str(v) for k, v in overrides.items()}, constraints=on,
                compile_s=time.perf_counter() - start)
  return report


def table(reports: list[dict]) -> str:
  gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
  lines = ["| row | config | topology, mesh | batch | args GiB | temps GiB | total GiB | fits |"
           " roofline step: compute, HBM | on-policy sampler GiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    m = r["per_chip_bytes"]
    mesh = "(" + ", ".join(str(v) for v in r["mesh"].values()) + ")"
    extra = ", ".join(f"{k}={v}" for k, v in r["overrides"].items() if k != "mesh.shape")
    extra += "" if r["constraints"] else (", " if extra else "") + "no constraints"
    bound = (f"{r['compute_time_s'] * 1e3:.0f} ms, {r['memory_time_s'] * 1e3:.0f} ms"
             if "compute_time_s" in r else "-")
    oom = " (compiler: out of memory)" if r.get("compiler_out_of_memory") else ""
    smp = r.get("sampler")
    sampler = "-" if smp is None else (
        f"{gib(smp['arguments'])} + {gib(smp['temporaries'])} = {gib(smp['total'])}"
        f" ({smp['rows']} rows, cache {smp['cache_len']})")
    lines.append(f"| {r['row']} | {r['config']}{' (' + extra + ')' if extra else ''} |"
                 f" {r['topology']} {mesh} | {r['batch']} | {gib(m['arguments'])} |"
                 f" {gib(m['temporaries'])}{oom} | {gib(m['total'])} |"
                 f" {'yes' if r['fits'] else 'no'} | {bound} | {sampler} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "plan.md"))
  parser.add_argument("--update", action="store_true",
                      help="replace these rows in the existing results, keep the others")
  args = parser.parse_args()
  reports = []
  if args.update:
    with open(os.path.splitext(args.out)[0] + ".json", encoding="utf-8") as f:
      kept = {r["row"]: r for r in json.load(f)}
  for name in args.rows.split(","):
    report = run_row(name)
    reports.append(report)
    print(f"{name}: total {report['per_chip_bytes']['total'] / 2**30:.2f} GiB,"
          f" fits={report['fits']}, {report['compile_s']:.0f} s", flush=True)
  if args.update:
    fresh = {r["row"]: r for r in reports}
    reports = [fresh.pop(r, kept[r]) for r in kept] + list(fresh.values())
  import importlib.metadata as md  # noqa: PLC0415
  header = (f"# Pod recipes planned with the TPU compiler\n\n`python bench/plan.py`: jax"
            f" {jax.__version__}, libtpu {md.version('libtpu')}, compiled on a 2-core x86_64 CPU"
            f" box (no TPU). Per chip: arguments (student parameters and Adam state, the"
            f" teacher's parameters, the batch) and the compiler's temporaries, against the"
            f" chip's HBM (v5e 16 GiB, 15.75 usable; v5p 95 GiB). The roofline bound is the"
            f" larger of model FLOPs at the chip's bf16 peak and the compiler's bytes at its"
            f" HBM bandwidth (ICI traffic not counted).\n\n")
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(header + table(reports) + "\n")
  with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(reports, f, indent=1)
  print(table(reports))


if __name__ == "__main__":
  main()
