"""jkd on one GPU: tests, the fused loss, the distillation step and the sampler, with figures.

    bash bench/device_check.sh                  # a GPU machine: installs, then this (8 minutes)
    bash bench/device_check.sh --dry-run        # anywhere: the same code at tiny shapes, CPU
    python bench/device_check.py --dry-run --out /tmp/check   # this driver alone

Four parts, each in a process of its own with its own time limit (a slow part cannot eat the
others' time; what a part leaves unused goes to the next ones), each writing
``gpu_<part>.md`` under ``--out`` (default ``bench/results``; the dry run's default is a new
temporary folder, never the committed results), which names the device:

1. ``tests``: the test suite's model, loss, sampler and engine tests (:data:`TESTS`) on the
   GPU, float32 products at full precision (``JAX_DEFAULT_MATMUL_PRECISION=highest``: the tests
   compare with float64 references; TF32 would miss their tolerances);
2. ``fused_loss``: the fused (chunked) generalized JSD, loss + gradient, at the Llama-3 shape
   (N, H, V = 8192, 4096, 128256, bf16) against the unfused form: ``memory_analysis()`` of each
   compiled form, the device's peak memory, and the time, beside Liger-Kernel's published H100
   figures (:data:`LIGER_PUBLISHED`) and Liger measured in the same run when ``liger-kernel``
   is installed;
3. ``train_step``: ``bench/train_step.py``'s distillation step (SmolLM2-135M teacher, 6-layer
   student, generalized JSD + AdamW) at batch 8 x 1024 in bf16 mixed precision, jkd (full and
   fused logits) against the PyTorch loop in the same process, MFU against the card's dense
   bf16 peak (:data:`DENSE_BF16_PEAK`) and the measured one;
4. ``sampler``: ``jkd.sampling.generate`` against transformers' ``generate``, greedy, SmolLM2
   in bf16, batch 1 and 32.

``--dry-run`` runs every part on the CPU at tiny shapes (random models, no GGUF, no Liger), in
CI; the PyTorch sides run where torch is installed and are otherwise reported as skipped, with
the reason. Every part's file says that the GPU figures are still to come.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PARTS = ("tests", "fused_loss", "train_step", "sampler")
TITLES = {"tests": "model, loss, sampler and engine tests",
          "fused_loss": "the fused distillation loss at the Llama-3 shape",
          "train_step": "the distillation step, jkd vs PyTorch",
          "sampler": "jkd.sampling vs transformers' generate"}

#: Seconds each part is planned to take (the 8-minute budget less the installs): the limits
#: are these shares of the time left when the part starts.
BUDGET = {"tests": 120, "fused_loss": 70, "train_step": 120, "sampler": 110}
DRY_BUDGET = {"tests": 45, "fused_loss": 30, "train_step": 45, "sampler": 45}

#: The tests run on the GPU, in this order (pytest stops when the part's time is up, and the
#: file counts the tests left): the backend's code paths, the losses, the engine's step, setup
#: and evaluation, the sampler and the model (about 2 minutes). Not the tests that start processes
#: of their own on simulated CPU devices: those would run on the CPU.
TESTS = ("tests/test_backend_paths.py", "tests/test_precision.py", "tests/test_fused.py",
         "tests/test_divergences.py", "tests/test_objective.py", "tests/test_train_setup.py",
         "tests/test_train_eval.py",
         "tests/test_sampling.py::test_greedy_equals_no_cache_reference_loop",
         "tests/test_sampling.py::test_kv_cache_logits_equal_no_cache_logits_at_each_step",
         "tests/test_sampling.py::test_kv_cache_logits_equal_no_cache_logits_other_architectures",
         "tests/test_sampling.py::test_sample_frequencies_match_softmax",
         "tests/test_models.py::test_forward_matches_numpy",
         "tests/test_models.py::test_left_padding_and_packing_equal_separate_runs")
#: The dry run's subset (seconds on a 2-core CPU).
DRY_TESTS = ("tests/test_backend_paths.py::test_the_real_backend_takes_its_branch",
             "tests/test_backend_paths.py::test_decode_step_off_cpu_has_no_barrier_and_no_"
             "transposed_weights",
             "tests/test_backend_paths.py::test_precision_off_cpu_contracts_the_original_axes",
             "tests/test_precision.py::test_bfloat16_products_and_gradients")

#: Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a part of the card's name, first
#: match wins (NVIDIA's datasheets: H100 SXM5, H100 PCIe, H100 NVL, H200 SXM, A100, L40S, L4).
DENSE_BF16_PEAK = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
                   ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))

#: Liger-Kernel's published figures for its fused linear JSD at N, H, V = 8192, 4096, 128256,
#: bf16, forward + backward, on an H100 (Liger-Kernel's benchmark data, as quoted in jkd
#: issue #19): peak memory allocated and time, Liger's chunked kernel and plain PyTorch.
LIGER_PUBLISHED = {"liger fused linear JSD": (11.1e9, 60.7e-3),
                   "plain PyTorch (logits materialised)": (68.9e9, 213e-3)}

#: The sizes of each part on the GPU and (``"dry"``) in the dry run: the loss's N, H, V, chunk
#: (None: jkd's default) and repeats; the step's batch x sequence and timed steps; the sampler's
#: batches, new tokens and repeats.
SIZES = {
    "gpu": dict(loss=(8192, 4096, 128256), chunk=None, loss_repeats=5, step=(8, 1024), steps=10,
                batches=(1, 32), new_tokens=128, sample_repeats=3),
    "dry": dict(loss=(256, 64, 512), chunk=64, loss_repeats=2, step=(2, 32), steps=2,
                batches=(1, 32), new_tokens=8, sample_repeats=1),
}
GB = 1e9


# ------------------------------------------------------------------------------------------------
# Report files


def card() -> str:
  """The GPU's name and memory from ``nvidia-smi``, or why there is none."""
  if shutil.which("nvidia-smi") is None:
    return "none (no nvidia-smi)"
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (subprocess.SubprocessError, OSError) as e:
    return f"none (nvidia-smi failed: {e})"
  return out.strip().splitlines()[0] if out.strip() else "none (nvidia-smi lists no GPU)"


def dense_bf16_peak(name: str) -> float | None:
  """The card's dense bf16 peak (FLOP/s) from :data:`DENSE_BF16_PEAK`, or None."""
  return next((peak for key, peak in DENSE_BF16_PEAK if key in name), None)


def size(nbytes: float) -> str:
  return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.2f} MB"


def header(part: str, args, device_kind: str, backend: str) -> list[str]:
  import jax  # noqa: PLC0415
  lines = [f"# jkd on one GPU: {TITLES[part]}", "",
           f"- device: `{device_kind}` (JAX backend `{backend}`, jax {jax.__version__});"
           f" card (nvidia-smi): {args.card}",
           f"- written by `bash bench/device_check.sh{' --dry-run' if args.dry_run else ''}`,"
           f" {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
  if args.install_note:
    lines.append(f"- installs: {args.install_note}")
  if args.dry_run:
    lines.append("- **dry run**: the same code at tiny shapes on the CPU, as CI runs it. The GPU"
                 " figures are still to come: `bash bench/device_check.sh` on a GPU machine"
                 " writes them to `bench/results/gpu_*.md`.")
  return lines + [""]


def write(path: str, lines: list[str]) -> None:
  with open(path, "w") as f:
    f.write("\n".join(lines).rstrip() + "\n")


def device_info():
  import jax  # noqa: PLC0415
  device = jax.devices()[0]
  return device, device.device_kind, jax.default_backend()


def peak_bytes(device) -> int | None:
  """The device's peak memory in use so far (GPU and TPU; None on the CPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("peak_bytes_in_use")


def median_s(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def torch_device(dry_run: bool) -> tuple[str | None, str]:
  """``(torch device, "")`` for the PyTorch sides, or ``(None, why they are skipped)``."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None, ("skipped: torch is not installed (`pip install -e '.[bench]'`; the test"
                  " environment has no PyTorch)")
  if dry_run:
    return "cpu", ""
  if not torch.cuda.is_available():
    return None, f"skipped: torch {torch.__version__} sees no CUDA device"
  return "cuda", ""


# ------------------------------------------------------------------------------------------------
# 1. tests


def junit_file(classname: str) -> str:
  """``tests/test_x.py`` from a JUnit classname ``tests.test_x`` or ``tests.test_x.TestClass``."""
  parts = classname.split(".")
  for end in range(len(parts), 0, -1):
    file = "/".join(parts[:end]) + ".py"
    if os.path.exists(os.path.join(ROOT, file)):
      return file
  return classname


#: Why pytest stopped early: the tests part's time was up.
OUT_OF_TIME = "the tests part's share of the time budget was spent"


# A pytest plugin (``-p device_check``): stops the session when a test ends after the deadline,
# and writes how many tests were collected.
def pytest_collection_modifyitems(session, config, items):
  del session, config
  if "JKD_CHECK_COLLECTED" in os.environ:
    with open(os.environ["JKD_CHECK_COLLECTED"], "w") as f:
      f.write(str(len(items)))


def pytest_runtest_teardown(item, nextitem):
  del nextitem
  if time.time() > float(os.environ.get("JKD_CHECK_DEADLINE", "inf")):
    item.session.shouldstop = OUT_OF_TIME


def part_tests(args, path: str) -> int:
  _, kind, backend = device_info()
  subset = DRY_TESTS if args.dry_run else TESTS
  scratch = tempfile.mkdtemp(prefix="jkd_check_")
  atexit.register(shutil.rmtree, scratch, True)
  xml, collected = os.path.join(scratch, "tests.xml"), os.path.join(scratch, "collected")
  env = dict(os.environ, JAX_PLATFORMS={"gpu": "cuda"}.get(backend, backend),
             JKD_CHECK_DEADLINE=str(args.deadline - 25),  # time for a last test and the file
             JKD_CHECK_COLLECTED=collected,
             PYTHONPATH=BENCH + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if backend != "cpu":
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "device_check", f"--junitxml={xml}", *subset], cwd=ROOT, env=env,
                        check=False)
  wall = time.perf_counter() - t0
  lines = header("tests", args, kind, backend)
  lines += [f"`python -m pytest {' '.join(subset)}` with JAX_PLATFORMS={env['JAX_PLATFORMS']}"
            + (", JAX_DEFAULT_MATMUL_PRECISION=highest" if backend != "cpu" else ""), "",
            "| test file | tests | passed | failed | skipped | seconds |",
            "|---|---|---|---|---|---|"]
  totals = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0}
  failures = []
  rows: dict[str, dict] = {}
  for case in ET.parse(xml).getroot().iter("testcase") if os.path.exists(xml) else ():
    file = junit_file(case.get("classname", ""))
    row = rows.setdefault(file, {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "s": 0.0})
    problem = case.find("failure") if case.find("failure") is not None else case.find("error")
    outcome = ("failed" if problem is not None else
               "skipped" if case.find("skipped") is not None else "passed")
    row["tests"] += 1
    row[outcome] += 1
    row["s"] += float(case.get("time", 0))
    if problem is not None:
      message = (problem.get("message") or "").strip().splitlines() or [""]
      failures.append(f"- `{file}::{case.get('name')}`: {message[0][:200]}")
  for file, row in sorted(rows.items()):
    lines.append(f"| {file} | {row['tests']} | {row['passed']} | {row['failed']} |"
                 f" {row['skipped']} | {row['s']:.1f} |")
    for k in totals:
      totals[k] += row[k]
  lines += ["", f"{totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
            f" of {totals['tests']} tests in {wall:.0f} s (pytest exit status {proc.returncode})"]
  expected = int(open(collected).read()) if os.path.exists(collected) else totals["tests"]
  if expected > totals["tests"]:
    lines.append(f"{expected - totals['tests']} of the {expected} tests collected did not run:"
                 f" {OUT_OF_TIME}.")
  if failures:
    lines += ["", "Failures:", *failures]
  write(path, lines)
  stopped = expected > totals["tests"] and totals["failed"] == 0  # for time, nothing failed
  return 0 if stopped else proc.returncode


# ------------------------------------------------------------------------------------------------
# 2. the fused loss


def liger_measured(n, h, v, repeats) -> tuple[float, float] | str:
  """Liger's fused linear JSD (beta 0.5), forward + backward, on the GPU: ``(peak bytes, s)``,
  or why it did not run."""
  try:
    import torch  # noqa: PLC0415
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD  # noqa: PLC0415
  except ImportError as e:
    return f"skipped: {e.name or e} is not installed (liger-kernel, best effort)"
  if not torch.cuda.is_available():
    return "skipped: torch sees no CUDA device"
  result = _liger_run(torch, LigerFusedLinearJSD(jsd_beta=0.5), n, h, v, repeats)
  torch.cuda.empty_cache()  # its tensors are gone: the memory goes back for JAX
  return result


def _liger_run(torch, loss_fn, n, h, v, repeats) -> tuple[float, float]:
  gen = torch.Generator(device="cuda").manual_seed(0)
  kw = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
  hs = torch.randn(n, h, **kw).requires_grad_()
  ws = (torch.randn(v, h, **kw) * 0.05).requires_grad_()  # Liger's heads are [V, H]
  ht, wt = torch.randn(n, h, **kw), torch.randn(v, h, **kw) * 0.05

  def step():
    hs.grad = ws.grad = None
    loss_fn(hs, ws, ht, wt).backward()
    torch.cuda.synchronize()

  step()  # Triton compiles
  torch.cuda.reset_peak_memory_stats()
  seconds = median_s(step, repeats)
  return float(torch.cuda.max_memory_allocated()), seconds


def part_fused_loss(args, path: str) -> int:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import losses as loss_bench  # bench/losses.py  # noqa: PLC0415
  from jkd import losses  # noqa: PLC0415
  device, kind, backend = device_info()
  dims = SIZES["dry" if args.dry_run else "gpu"]
  (n, h, v), repeats = dims["loss"], dims["loss_repeats"]
  chunk = dims["chunk"] or losses.DEFAULT_CHUNK_SIZE
  liger = ("skipped: dry run (Liger's kernels need a CUDA GPU)" if args.dry_run
           else liger_measured(n, h, v, repeats))  # Before JAX holds any GPU memory.
  keys = jax.random.split(jax.random.key(0), 4)
  inputs = [jax.random.normal(k, s.shape, s.dtype) * (0.05 if i % 2 else 1.0)
            for i, (k, s) in enumerate(zip(keys, loss_bench.shapes(n, h, v, jnp.bfloat16)))]
  rows, values = {}, {}
  for name, fn in loss_bench.forms("generalized_jsd", chunk).items():  # fused first
    compiled = fn.lower(*inputs).compile()
    mem = compiled.memory_analysis()
    values[name] = jax.block_until_ready(compiled(*inputs))
    seconds = median_s(lambda c=compiled: jax.block_until_ready(c(*inputs)), repeats)
    rows[name] = dict(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes,
                      out=mem.output_size_in_bytes, peak=peak_bytes(device), s=seconds)
  (lf, (_, gwf)), (lu, (_, gwu)) = values["fused"], values["unfused"]
  lines = header("fused_loss", args, kind, backend)
  lines += [f"generalized JSD (beta 0.5), loss + gradient of the student's hidden states and"
            f" head, N, H, V = {n}, {h}, {v}, bfloat16 operands, float32 logits; jkd chunk"
            f" {chunk} tokens; median of {repeats} runs after a warm-up", "",
            "| implementation | compiled temporaries | arguments + outputs |"
            " total (memory_analysis) | device peak in use | ms |", "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    peak = "-" if r["peak"] is None else size(r["peak"])
    lines.append(f"| jkd {name} | {size(r['temp'])} | {size(r['args'] + r['out'])} |"
                 f" {size(r['temp'] + r['args'] + r['out'])} | {peak} | {1e3 * r['s']:.1f} |")
  if isinstance(liger, tuple):
    lines.append(f"| Liger fused linear JSD, measured here | - | - | - | {size(liger[0])} |"
                 f" {1e3 * liger[1]:.1f} |")
  for name, (mem, seconds) in LIGER_PUBLISHED.items():
    lines.append(f"| {name}, published (H100) | - | - | - | {size(mem)} |"
                 f" {1e3 * seconds:.1f} |")
  measured_note = "see the table" if isinstance(liger, tuple) else liger
  lines += ["", f"Liger measured in this run: {measured_note}",
            f"fused vs unfused: |loss diff| {float(abs(lf - lu)):.2e}, max |head grad diff|"
            f" {float(jnp.max(jnp.abs(gwf.astype(jnp.float32) - gwu.astype(jnp.float32)))):.2e};"
            " device peak: the largest in use so far in this process (the fused form runs"
            " first). Liger's figures are `torch.cuda.max_memory_allocated`, inputs included:"
            " compare them with the total or the device peak."]
  write(path, lines)
  return 0


# ------------------------------------------------------------------------------------------------
# 3. the distillation step


def tiny_teacher():
  """A random 10-layer teacher for the dry run (the 6-of-30 student takes 2 of its layers)."""
  import jax  # noqa: PLC0415
  from jkd import models  # noqa: PLC0415
  config = models.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_layers=10, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=256)
  return config, models.init_params(config, jax.random.key(0))


def hf_copy(params, config) -> str:
  """The model as a Hugging Face directory (for the PyTorch sides of the dry run)."""
  from jkd import models  # noqa: PLC0415
  directory = tempfile.mkdtemp(prefix="jkd_check_hf_")
  atexit.register(shutil.rmtree, directory, True)
  models.save_hf(directory, params, config)
  return directory


def part_train_step(args, path: str) -> int:
  import jax  # noqa: PLC0415
  import train_step as step_bench  # bench/train_step.py  # noqa: PLC0415
  from jkd import train  # noqa: PLC0415
  from jkd.models import gguf_io  # noqa: PLC0415
  _, kind, backend = device_info()
  dims = SIZES["dry" if args.dry_run else "gpu"]
  (batch, seq), steps = dims["step"], dims["steps"]
  if args.dry_run:
    tcfg, tparams = tiny_teacher()
    model_name = "a random 10-layer teacher (width 64) -> 2-layer student"
  else:
    gguf = gguf_io.smollm2_gguf_path()
    tcfg, tparams = gguf_io.load_gguf(gguf)
    model_name = "SmolLM2-135M teacher (30 layers) -> 6-layer student"
  tparams = jax.device_put(tparams)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tcfg.vocab_size, (batch, seq)).astype(np.int32)
  labels = np.roll(tokens, -1, 1)
  labels[:, -1] = -100
  data = {"tokens": tokens, "labels": labels}
  runs, states, mems = {}, {}, {}
  for name, fused in (("jkd", False), ("jkd fused", True)):
    scfg, states[name], runs[name], mems[name] = step_bench.jkd_step(
        tcfg, tparams, data, 1e-4, fused=fused, precision="bfloat16")
  where, torch_note = torch_device(args.dry_run)
  if where is not None:
    source = hf_copy(tparams, tcfg) if args.dry_run else gguf
    runs["pytorch"] = step_bench.torch_step(source, tcfg, data, 1e-4, "bfloat16", device=where)
    states["pytorch"] = None
  for name, run in runs.items():  # warm-up: compilation, allocators
    states[name], _ = run(states[name])
  times = {name: [] for name in runs}
  for _ in range(steps):  # interleaved
    for name, run in runs.items():
      t0 = time.perf_counter()
      states[name], _ = run(states[name])  # returns the loss: the step has finished
      times[name].append(time.perf_counter() - t0)
  flops = train.step_flops(scfg, tcfg, batch * seq, seq)
  measured = step_bench.matmul_peak(n=1024 if args.dry_run else 8192, dtype="bfloat16")
  datasheet = dense_bf16_peak(kind) or dense_bf16_peak(args.card)
  lines = header("train_step", args, kind, backend)
  lines += [f"{model_name}, batch {batch} x {seq} tokens, bf16 mixed precision (bf16 teacher;"
            " bf16 compute, f32 parameters for the student), generalized JSD + AdamW;"
            f" model FLOPs/step {flops / 1e9:.1f} G; {steps} interleaved timed steps",
            "MFU against the card's dense bf16 peak: "
            + (f"{datasheet / 1e12:.0f} TFLOP/s (datasheet)" if datasheet else
               f"unknown card `{kind}` (no datasheet peak)")
            + f"; measured bf16 matmul peak here {measured / 1e12:.2f} TFLOP/s", "",
            "| implementation | s/step (median) | tokens/s | MFU (datasheet) |"
            " MFU (measured peak) |", "|---|---|---|---|---|"]
  rates = {}
  for name, ts in times.items():
    med = float(np.median(ts))
    rates[name] = batch * seq / med
    mfu = f"{100 * flops / med / datasheet:.1f}%" if datasheet else "unknown card"
    lines.append(f"| {name} | {med:.4f} | {rates[name]:.0f} | {mfu} |"
                 f" {100 * flops / med / measured:.1f}% |")
  lines.append("")
  if "pytorch" in rates:
    import torch  # noqa: PLC0415
    lines.append(f"PyTorch {torch.__version__} on `{where}`: jkd / PyTorch tokens/s"
                 f" {rates['jkd'] / rates['pytorch']:.2f}x (full logits),"
                 f" {rates['jkd fused'] / rates['pytorch']:.2f}x (fused loss)")
  else:
    lines.append(f"PyTorch: {torch_note}")
  for name, m in mems.items():
    lines.append(f"{name} compiled step memory (memory_analysis): temporaries"
                 f" {size(m.temp_size_in_bytes)}, arguments {size(m.argument_size_in_bytes)}")
  write(path, lines)
  return 0


# ------------------------------------------------------------------------------------------------
# 4. the sampler


def part_sampler(args, path: str) -> int:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import sampler as sampler_bench  # bench/sampler.py  # noqa: PLC0415
  from jkd.models import gguf_io  # noqa: PLC0415
  _, kind, backend = device_info()
  dims = SIZES["dry" if args.dry_run else "gpu"]
  batches, new_tokens, repeats = dims["batches"], dims["new_tokens"], dims["sample_repeats"]
  if args.dry_run:
    config, params = tiny_teacher()
    config = config.replace(num_layers=2)
    params = dict(params, layers=jax.tree.map(lambda a: a[:2], params["layers"]))
    prompts = [np.random.default_rng(i).integers(1, 256, 3 + i % 5).tolist() for i in range(8)]
    model_name, dtype = "a random 2-layer model (width 64), float32", "float32"
  else:
    gguf = gguf_io.smollm2_gguf_path()
    config, params = gguf_io.load_gguf(gguf)
    tokenizer = gguf_io.load_tokenizer(gguf)
    prompts = [tokenizer(p)["input_ids"] for p in sampler_bench.PROMPTS]
    model_name, dtype = "SmolLM2-135M-Instruct, bfloat16", "bfloat16"
  config = config.replace(dtype=dtype, param_dtype=dtype)
  params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  where, torch_note = torch_device(args.dry_run)
  hf = None
  if where is not None:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415
    source = ({"pretrained_model_name_or_path": hf_copy(params, config)} if args.dry_run else
              {"pretrained_model_name_or_path": os.path.dirname(gguf),
               "gguf_file": os.path.basename(gguf)})
    hf = AutoModelForCausalLM.from_pretrained(**source, dtype=getattr(torch, dtype)).to(where)
    hf = hf.eval()
    hf.generation_config.eos_token_id = None  # exactly new_tokens, like jkd with no eos
  lines = header("sampler", args, kind, backend)
  lines += [f"{model_name}: greedy decoding of {new_tokens} new tokens per sequence (no EOS"
            f" stop) from left-padded prompts, tokens/s of the whole batch over the whole call"
            f" (prefill included), median of {repeats} interleaved runs after a warm-up", "",
            "| batch | jkd tok/s | transformers tok/s | jkd / transformers | jkd compile s |"
            " same tokens |", "|---|---|---|---|---|---|"]
  for batch in batches:
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    runs = {"jkd": sampler_bench.jkd_runner(params, config, rows, new_tokens, None)}
    if hf is not None:
      runs["hf"] = sampler_bench.hf_runner(hf, rows, new_tokens, os.cpu_count() or 1)
    t0 = time.perf_counter()
    outs = {name: run() for name, run in runs.items()}  # warm-up; jkd compiles
    first = time.perf_counter() - t0
    times = {name: [] for name in runs}
    for _ in range(repeats):
      for name, run in runs.items():
        t0 = time.perf_counter()
        outs[name] = run()
        times[name].append(time.perf_counter() - t0)
    tps = {name: batch * new_tokens / float(np.median(ts)) for name, ts in times.items()}
    compile_s = first - sum(float(np.median(ts)) for ts in times.values())
    if hf is not None:
      same = f"{100 * float(np.mean(outs['jkd'] == outs['hf'])):.0f}%"
      hf_cols = f"{tps['hf']:.1f} | {tps['jkd'] / tps['hf']:.2f}x"
    else:
      same, hf_cols = "-", "skipped | -"
    lines.append(f"| {batch} | {tps['jkd']:.1f} | {hf_cols} | {max(compile_s, 0.0):.1f} |"
                 f" {same} |")
    write(path, lines + ["", "(the next batch size was still running)"])
  lines.append("")
  if hf is None:
    lines.append(f"transformers: {torch_note}")
  else:
    import torch  # noqa: PLC0415
    lines.append(f"transformers' generate with torch {torch.__version__} on `{where}`")
  write(path, lines)
  return 0


RUN_PART = {"tests": part_tests, "fused_loss": part_fused_loss, "train_step": part_train_step,
            "sampler": part_sampler}


# ------------------------------------------------------------------------------------------------
# The driver


def default_out(dry_run: bool) -> str:
  """``bench/results``; for a dry run a new temporary folder (never the committed figures)."""
  return tempfile.mkdtemp(prefix="jkd_device_check_") if dry_run else os.path.join(BENCH, "results")


def run_part(part: str, args, timeout: float) -> tuple[int, str]:
  """Runs one part in its own process group, killed with all its children at ``timeout``."""
  cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out,
         "--card", args.card, "--install-note", args.install_note,
         "--deadline", str(time.time() + timeout)]
  if args.dry_run:
    cmd.append("--dry-run")
  path = os.environ.get("PYTHONPATH", "")
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=ROOT + (os.pathsep + path if path else ""),  # this checkout's jkd
             # JAX and PyTorch share the GPU: JAX allocates as it goes instead of taking 75%.
             XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if args.dry_run:
    env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return 124, f"timed out after {timeout:.0f} s (its share of the time budget)"
  return code, "" if code == 0 else f"failed with exit status {code} (its output is above)"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
  parser.add_argument("--out", default="", help="folder for gpu_*.md (default: bench/results;"
                      " the dry run's: a new temporary folder)")
  parser.add_argument("--budget", type=float, default=0.0,
                      help="seconds for all parts (default: the sum of their plans)")
  parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
  parser.add_argument("--card", default="", help="the card's name (default: from nvidia-smi)")
  parser.add_argument("--install-note", default="", help="what the installs did, for the files")
  parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in-process
  parser.add_argument("--deadline", type=float, default=float("inf"),
                      help=argparse.SUPPRESS)  # the part's end, time.time()
  args = parser.parse_args(argv)
  args.out = args.out or default_out(args.dry_run)
  if not args.card:
    args.card = "none (dry run)" if args.dry_run else card()
  if args.part:
    sys.path[:0] = [BENCH, ROOT]  # bench/'s scripts, and this checkout's jkd
    from jkd import runtime  # noqa: PLC0415
    runtime.quiet_libraries()
    return RUN_PART[args.part](args, os.path.join(args.out, f"gpu_{args.part}.md"))

  os.makedirs(args.out, exist_ok=True)
  plan = DRY_BUDGET if args.dry_run else BUDGET
  budget = args.budget or sum(plan[p] for p in args.parts)
  deadline = time.monotonic() + budget
  print(f"device_check: card {args.card}; parts {', '.join(args.parts)} in {budget:.0f} s;"
        f" results in {args.out}", flush=True)
  status = {}
  for i, part in enumerate(args.parts):
    left = deadline - time.monotonic()
    limit = left * plan[part] / sum(plan[p] for p in args.parts[i:])
    path = os.path.join(args.out, f"gpu_{part}.md")
    if os.path.exists(path):
      os.remove(path)  # a part that fails early must not leave an older run's figures
    t0 = time.monotonic()
    if limit < 5:
      code, why = 124, "not run: the time budget was spent by the parts before it"
    else:
      print(f"== {part} (at most {limit:.0f} s)", flush=True)
      code, why = run_part(part, args, limit)
    status[part] = (code, time.monotonic() - t0)
    if code != 0:
      previous = open(path).read().rstrip().splitlines() if os.path.exists(path) else [
          f"# jkd on one GPU: {TITLES[part]}", "", f"- card (nvidia-smi): {args.card}"]
      write(path, previous + ["", f"**This part did not finish: {why}.**"])
  for part, (code, seconds) in status.items():
    print(f"device_check: {part}: {'ok' if code == 0 else f'exit {code}'} in {seconds:.0f} s")
  return 0 if all(code == 0 for code, _ in status.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
