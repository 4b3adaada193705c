"""Plan a run for hardware it does not run on: compile its training step for a TPU slice (or
simulated CPU devices) from shapes alone and report memory per chip, FLOPs and a roofline bound.

``python -m jkd.plan --config configs/<name>.py[:arg] --topology v5e-16 [--config.k=v ...]``

The run is built by :func:`jkd.train.setup.setup` on the topology's devices (no weights are
read, except that a GGUF teacher's config is read with its file), the step is lowered for a
global batch of ``data.batch_size x data.seq_len`` tokens and compiled by the platform's own
compiler: for TPU names that is the real TPU compiler of ``libtpu`` (``pip install
"jax[tpu]==<jax version>"``), run on this machine through
``jax.experimental.topologies.get_topology_desc``. The report, per chip: the arguments (the
student's parameters and optimizer state, the teacher's parameters, the batch), the compiler's
temporaries, their total against the chip's HBM, the step's FLOPs and bytes, and the roofline
lower bound on the step time with the MFU it implies (from the chip's published peaks).

Topologies: ``v4-N``, ``v5p-N`` (N TensorCores, two per chip, as Cloud TPU names them),
``v5e-N``, ``v6e-N`` (N chips), or an explicit ``v5e:4x4``; ``cpu:N`` for N simulated CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``; memory against
``--hbm_gib``).

Exit status: 0 when the step fits, 7 when it does not (the message names what to change), and
the codes of :mod:`jkd.errors` for bad input (2).

Batches: token batches (an online teacher), token batches with an offline teacher's top-k
(``teacher.online=False``; ``--topk``), or preference pairs (an objective with a preference
term). On-policy recipes (``onpolicy.mode``) also get the sampler's program compiled and
reported (prefill and decode loop with its KV cache); the run fits when both do.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Mapping

from jkd import errors

EXIT_DOES_NOT_FIT = 7


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU chip's published figures: HBM (GiB), dense bf16 peak (TFLOP/s), HBM bandwidth
  (GB/s), and how many TensorCores its slice names count per chip."""
  hbm_gib: float
  bf16_tflops: float
  hbm_gbps: float
  cores_per_chip: int


#: Cloud TPU's published per-chip figures.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32.0, 275.0, 1228.0, 2),
    "v5e": Chip(16.0, 197.0, 819.0, 1),
    "v5p": Chip(95.0, 459.0, 2765.0, 2),
    "v6e": Chip(32.0, 918.0, 1640.0, 1),
}

#: Slice shapes by chip count: 2-D tori (v5e, v6e) and 3-D (v4, v5p).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}


def parse_topology(name: str) -> tuple[str, str, int]:
  """``(generation, slice shape, chips)`` of a TPU name: ``v5e-16`` or ``v5e:4x4``.

  >>> parse_topology("v5e-16"), parse_topology("v5p-64"), parse_topology("v4:2x2x2")
  (('v5e', '4x4', 16), ('v5p', '2x4x4', 32), ('v4', '2x2x2', 8))
  """
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)([-:])([0-9x]+)", name.strip().lower())
  if not m:
    raise ValueError(f"unknown topology {name!r}: use a Cloud TPU slice name such as v5e-16,"
                     f" v6e-8, v4-8 or v5p-64, an explicit shape such as v5e:4x4, or cpu:N"
                     f" (chips: {sorted(CHIPS)}).")
  gen, sep, rest = m.groups()
  chip = CHIPS[gen]
  table = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
  if sep == ":":
    dims = [int(d) for d in rest.split("x") if d]
    if len(dims) != (3 if table is _SHAPES_3D else 2):
      raise ValueError(f"topology {name!r}: {gen} slices are {'3' if table is _SHAPES_3D else '2'}"
                       f"-D, e.g. {gen}:{next(iter(table.values()))}.")
    return gen, rest, math.prod(dims)
  count = int(rest)
  if count % chip.cores_per_chip or count // chip.cores_per_chip not in table:
    sizes = [c * chip.cores_per_chip for c in table]
    raise ValueError(f"topology {name!r}: {gen} slices come in sizes {sizes}"
                     f"{' (TensorCores, two per chip)' if chip.cores_per_chip == 2 else ''}.")
  chips = count // chip.cores_per_chip
  return gen, table[chips], chips


def topology_devices(name: str) -> tuple[list[Any], Chip | None]:
  """The devices of a topology name (see the module docstring) and its chip (None for CPU)."""
  import jax  # noqa: PLC0415

  m = re.fullmatch(r"cpu:(\d+)", name.strip().lower())
  if m:
    n, have = int(m.group(1)), jax.devices("cpu")
    if n < 1 or n > len(have):
      raise ValueError(f"topology {name!r}: {len(have)} CPU devices here; start with"
                       f" XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 1)}.")
    return have[:n], None
  gen, shape, _ = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"topology {name!r} needs the TPU compiler: pip install"
                     f" 'jax[tpu]=={jax.__version__}' (libtpu runs on this machine; no TPU"
                     " is needed).")
  from jax.experimental import topologies  # noqa: PLC0415
  # libtpu admits one process per machine (a lock file) unless told otherwise; a plan only
  # compiles, so it may share the machine with any other JAX process that loaded libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  hosts = (2, 2, 1)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{shape}",
                                      chip_config_name="default", chips_per_host_bounds=hosts,
                                      num_slices=1)
  return list(desc.devices), CHIPS[gen]


def _bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct`` leaves (the largest
  shard: uneven shardings pad)."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def batch_shapes(run, batch_size: int, seq_len: int, *, topk: int = 64
                 ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], str]:
  """``(global batch shapes, their dtypes (int32 unless named), the batch kind)`` of a run's
  step: ``pairs`` (chosen/rejected, when a preference term is in the objective), ``cache`` (an
  offline teacher's top-``topk`` ids and log-probs, ``teacher.online=False``) or ``tokens``."""
  import numpy as np  # noqa: PLC0415

  from jkd.train import preference_step  # noqa: PLC0415

  rows = (batch_size, seq_len)
  names, _ = preference_step._needed_inputs(run.objective)  # pylint: disable=protected-access
  if names & {"policy_chosen", "policy"}:
    return ({f"{side}_{field}": rows for side in ("chosen", "rejected")
             for field in ("tokens", "labels")}, {}, "pairs")
  shapes = {"tokens": rows, "labels": rows}
  if run.online:
    return shapes, {}, "tokens"
  shapes.update(teacher_topk_ids=rows + (topk,), teacher_topk_logprobs=rows + (topk,),
                teacher_tail_logprob=rows)
  f32 = np.float32
  return shapes, {"teacher_topk_logprobs": f32, "teacher_tail_logprob": f32}, "cache"


def plan_sampler(run, config) -> dict[str, Any] | None:
  """The on-policy sampler's program (prefill + decode loop, KV cache) compiled for the run's
  devices, as the on-policy source calls it: the batch's rows, prompts of ``data.seq_len``
  tokens (its bucket), ``onpolicy.max_new_tokens`` new ones, the student's parameters in their
  training shardings, traced inside the run's activation sharding (batch-sharded prefill,
  decode and KV cache). None without ``onpolicy.mode``.

  Returns:
    ``{"rows", "prompt_len", "cache_len", "arguments", "temporaries", "total"}`` (bytes per
    chip), or the compiler's out-of-memory figure as ``temporaries`` with ``"out_of_memory"``.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

  from jkd import partitioning  # noqa: PLC0415
  from jkd.sampling import sampler  # noqa: PLC0415

  onpolicy = config.get("onpolicy")
  if onpolicy is None or not onpolicy.mode:
    return None
  seq_len, rows = int(config.data.seq_len), int(config.data.batch_size)
  max_new = min(int(onpolicy.max_new_tokens), seq_len)
  prompt_len, cache_len = sampler._lengths(  # pylint: disable=protected-access
      seq_len, max_new, run.student_config, seq_len, None)
  batch = sampler.batch_bucket(rows)
  fn = sampler._program(  # pylint: disable=protected-access
      run.student_config, batch, prompt_len, cache_len, max_new, False, greedy=False, top_k=0,
      top_p=float(onpolicy.top_p), min_p=0.0)
  rep = NamedSharding(run.mesh, PartitionSpec())
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)  # noqa: E731
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = (run.abstract_state.params, sds((batch, prompt_len), jnp.int32),
          sds((batch, prompt_len), jnp.bool_), sds((batch,), jnp.bool_), sds((8,), jnp.int32),
          sds(key.shape, key.dtype), sds((), jnp.float32), sds((), jnp.float32),
          sds((), jnp.float32), sds((), jnp.int32))
  out = {"rows": batch, "prompt_len": prompt_len, "cache_len": cache_len}
  try:
    with partitioning.activation_sharding(run.mesh, run.rules):  # As the on-policy source.
      lowered = fn.lower(*args)
    memory = lowered.compile().memory_analysis()
  except Exception as e:  # noqa: BLE001 (only the compiler's out-of-memory is an answer)
    needed = _out_of_memory(str(e))
    if needed is None:
      raise
    arguments = _bytes_per_device(args)
    return {**out, "arguments": arguments, "temporaries": needed,
            "total": arguments + needed, "out_of_memory": True}
  arguments, temps = int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  return {**out, "arguments": arguments, "temporaries": temps,
          "total": arguments + temps + max(outputs, 0)}


def plan(config, topology: str, *, hbm_gib: float | None = None, topk: int = 64
         ) -> dict[str, Any]:
  """Compiles ``config``'s training step for ``topology``; returns the report as a dict.

  ``topk``: the ``k`` of an offline teacher cache (``teacher.online=False``).

  Raises:
    ValueError: a bad topology or config.
  """
  from jkd.train import setup as setup_lib  # noqa: PLC0415
  from jkd.train.step import batch_work  # noqa: PLC0415

  devices, chip = topology_devices(topology)
  run = setup_lib.setup(config, devices=devices)
  b, t = int(config.data.batch_size), int(config.data.seq_len)
  shapes, dtypes, kind = batch_shapes(run, b, t, topk=topk)
  lowered = run.lower(shapes, dtypes)
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (only the compiler's out-of-memory is a plan's answer)
    needed = _out_of_memory(str(e))
    if needed is None:
      raise
    return _oom_report(run, topology, devices, chip, hbm_gib, (b, t), kind, needed)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  student, optimizer, teacher = _state_bytes(run)
  args = int(memory.argument_size_in_bytes)
  temps = int(memory.temp_size_in_bytes)
  outputs = int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes)
  total = args + temps + max(outputs, 0)
  hbm = (chip.hbm_gib if chip else (hbm_gib or 0.0)) * 2**30
  flops = float(cost.get("flops", 0.0))
  moved = float(cost.get("bytes accessed", 0.0))
  n = len(devices)
  _, model_flops = batch_work(shapes, run.student_config, run.step_teacher_config,
                              run.objective)
  report = {
      "topology": topology, "devices": n, "mesh": dict(run.mesh.shape),
      "batch": f"{b} x {t}", "batch_kind": kind, "per_chip_bytes": {
          "student_params": student, "optimizer_state": optimizer, "teacher_params": teacher,
          "arguments": args, "temporaries": temps, "outputs_not_aliased": max(outputs, 0),
          "total": total},
      "hbm_bytes": hbm, "fits": bool(hbm == 0 or total <= hbm),
      "flops_per_chip": flops, "bytes_per_chip": moved, "model_flops": model_flops}
  sampler_report = plan_sampler(run, config)
  if sampler_report is not None:
    report["sampler"] = sampler_report
    report["fits"] = bool(report["fits"] and (hbm == 0 or sampler_report["total"] <= hbm))
  if chip is not None:
    peak, bandwidth = chip.bf16_tflops * 1e12, chip.hbm_gbps * 1e9
    # The compiler counts a loop's body once (the scan over layers, the fused loss's chunks),
    # so its FLOPs can fall short of the model's: the compute bound takes the larger.
    compute, memory_time = max(flops, model_flops / n) / peak, moved / bandwidth
    bound = max(compute, memory_time)
    report.update(step_time_bound_s=bound, compute_time_s=compute, memory_time_s=memory_time,
                  mfu_bound=model_flops / (n * peak * bound) if bound > 0 else 0.0)
  return report


def _state_bytes(run) -> tuple[int, int, int]:
  """``(student parameters, optimizer state, teacher parameters)`` bytes per device."""
  state = run.abstract_state
  optimizer = _bytes_per_device(state.opt_state) + _bytes_per_device(
      (state.term_params, state.term_opt_state))
  teacher = _bytes_per_device(run.abstract_teacher()) if run.online else 0
  return _bytes_per_device(state.params), optimizer, teacher


def _out_of_memory(message: str) -> int | None:
  """The temporaries' bytes of a TPU compiler's out-of-memory error (None: another error)."""
  m = re.search(r"memory required for HLO temporaries \(([0-9.]+)([KMGT])\)", message)
  if not m:
    return None
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


def _oom_report(run, topology, devices, chip, hbm_gib, batch, kind, temps) -> dict[str, Any]:
  """The report of a step the compiler refused for memory: temporaries from its message, the
  arguments counted from the shardings (the compiler gives no memory analysis then)."""
  student, optimizer, teacher = _state_bytes(run)
  args = student + optimizer + teacher
  hbm = (chip.hbm_gib if chip else (hbm_gib or 0.0)) * 2**30
  return {"topology": topology, "devices": len(devices), "mesh": dict(run.mesh.shape),
          "batch": f"{batch[0]} x {batch[1]}", "batch_kind": kind, "per_chip_bytes": {
              "student_params": student, "optimizer_state": optimizer,
              "teacher_params": teacher, "arguments": args, "temporaries": temps,
              "outputs_not_aliased": 0, "total": args + temps},
          "hbm_bytes": hbm, "fits": False, "compiler_out_of_memory": True,
          "flops_per_chip": 0.0, "bytes_per_chip": 0.0, "model_flops": 0.0}


def _gib(n: float) -> str:
  """Bytes in GiB, or MiB/KiB when small."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale or unit == "KiB":
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def format_report(r: Mapping[str, Any]) -> str:
  """The report as the lines ``python -m jkd.plan`` prints."""
  m, hbm = r["per_chip_bytes"], r["hbm_bytes"]
  kinds = {"tokens": "token batches", "cache": "token batches with an offline teacher's top-k",
           "pairs": "preference pairs"}
  lines = [f"plan: {r['topology']} ({r['devices']} devices, mesh {r['mesh']}), global batch"
           f" {r['batch']} tokens ({kinds[r['batch_kind']]})", "per chip:"]
  for key in ("student_params", "optimizer_state", "teacher_params", "arguments",
              "temporaries", "outputs_not_aliased", "total"):
    lines.append(f"  {key.replace('_', ' '):<22} {_gib(m[key])}")
  if hbm:
    lines.append(f"  {'HBM':<22} {_gib(hbm)} ({'fits' if r['fits'] else 'does not fit'},"
                 f" margin {_gib(hbm - m['total'])})")
  if r.get("compiler_out_of_memory"):
    lines.append("  (the compiler stopped at out of memory: temporaries are its figure, the"
                 " arguments the state's shards)")
    return "\n".join(lines)
  lines.append(f"  {'FLOPs per step':<22} {r['flops_per_chip']:.3g}; bytes accessed"
               f" {r['bytes_per_chip']:.3g}")
  if "sampler" in r:
    smp = r["sampler"]
    lines.append(f"  {'sampler (on-policy)':<22} {_gib(smp['total'])} = arguments"
                 f" {_gib(smp['arguments'])} + temporaries {_gib(smp['temporaries'])}"
                 f"{' (compiler: out of memory)' if smp.get('out_of_memory') else ''};"
                 f" {smp['rows']} rows, {smp['prompt_len']}-token prompts, KV cache"
                 f" {smp['cache_len']}")
  if "step_time_bound_s" in r:
    lines.append(f"  {'roofline step time':<22} >= {r['step_time_bound_s'] * 1e3:.2f} ms"
                 f" (compute {r['compute_time_s'] * 1e3:.2f} ms, HBM"
                 f" {r['memory_time_s'] * 1e3:.2f} ms; MFU <= {100 * r['mfu_bound']:.1f}%)")
  return "\n".join(lines)


def advice(r: Mapping[str, Any]) -> str:
  """What to change when the step does not fit."""
  m = r["per_chip_bytes"]
  tips = []
  if m["temporaries"] >= m["arguments"]:
    tips += ["student.remat=True", "a smaller data.batch_size or data.seq_len",
             "train.grad_accum > 1"]
  if m["teacher_params"]:
    tips += ["teacher.param_dtype=bfloat16", "an offline teacher (teacher.online=False with a"
             " teacher cache)"]
  tips += ["a mesh.shape that shards parameters over more devices (fsdp, tensor)",
           "a larger topology"]
  return "; ".join(tips)


def main(argv) -> int:
  from absl import flags  # noqa: PLC0415

  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  report = plan(_CONFIG.value, flags.FLAGS.topology, hbm_gib=flags.FLAGS.hbm_gib,
                topk=flags.FLAGS.topk)
  if flags.FLAGS.json:
    with open(flags.FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  print(format_report(report), flush=True)
  if not report["fits"]:
    print(f"error: the step needs {_gib(report['per_chip_bytes']['total'])} per chip but"
          f" {_gib(report['hbm_bytes'])} is available: try {advice(report)}.", file=sys.stderr,
          flush=True)
    return EXIT_DOES_NOT_FIT
  return 0


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from absl import logging
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]",
                                            lock_config=True)
  flags.DEFINE_string("topology", None, "v5e-16, v6e-8, v4-8, v5p-64, v5e:4x4 or cpu:N")
  flags.DEFINE_float("hbm_gib", None, "memory per device for cpu:N topologies (GiB)")
  flags.DEFINE_integer("topk", 64, "k of an offline teacher cache (teacher.online=False)")
  flags.DEFINE_string("json", None, "also write the report to this JSON file")
  flags.mark_flags_as_required(["config", "topology"])

  def _main(argv):
    logging.set_verbosity(logging.ERROR)
    try:
      return main(argv)
    except Exception as e:  # noqa: BLE001 (each failure becomes one line and an exit code)
      return errors.report(e)

  app.run(_main)
