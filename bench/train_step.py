"""One distillation step, jkd vs a plain PyTorch loop: tokens/s, MFU and compiled memory.

    python bench/train_step.py                 # SmolLM2-135M teacher, 6-layer student
    python bench/train_step.py --batch 4 --seq 256 --steps 5 --out bench/results/train_step.md
    python bench/train_step.py --precision bfloat16   # both frameworks in mixed precision

The step: teacher forward (frozen), student forward + backward, generalized JSD (beta 0.5, as
TRL's GKD defines it) + nothing else, AdamW update; jkd runs it twice, with full logits and with
the fused loss (``fused=True``: the same objective from hidden states, chunked over tokens).
The PyTorch side is transformers' Llama
model with the same weights, TRL's ``generalized_jsd_loss`` formula, and ``torch.optim.AdamW``,
in the same process, timed interleaved with jkd; PyTorch runs at the faster of its thread
counts on a probe step (``--threads``), since under load fewer threads can be faster. MFU is
model FLOPs (student 3x forward + teacher 1x forward) over the measured float32 matmul peak of
this machine (the bfloat16 one with ``--precision bfloat16``). PyTorch is needed only here,
never by jkd or its tests.

``--precision bfloat16`` runs both sides in mixed precision, as each framework is used for it:
jkd with the engine's ``teacher.param_dtype=bfloat16``, ``teacher.dtype=bfloat16`` and
``student.dtype=bfloat16`` (float32 student parameters and optimizer); PyTorch with the teacher
cast to bfloat16 and the student under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Both
compute the loss from float32 logits.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses, models, runtime, train
from jkd.models import gguf_io


#: How the host allocator ran (jkd.runtime.tune_host_allocator), for the result header.
ALLOCATOR = {True: "freed memory reused (jkd.runtime.tune_host_allocator, as jkd's entry points"
                   " run; PyTorch in this process runs with it too)",
             False: "glibc defaults (JKD_HOST_ALLOCATOR=system)"}


#: What each --precision runs, for the result header.
PRECISION = {"float32": "float32",
             "bfloat16": "bfloat16 mixed precision (bf16 teacher; bf16 compute, f32 parameters"
                         " for the student)"}


def matmul_peak(n: int = 3072, repeats: int = 10, dtype: str = "float32") -> float:
  """Measured matmul FLOP/s of this machine through XLA (``dtype`` operands, f32 results)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def jkd_step(tcfg, tparams, batch_np, lr, *, fused=False, precision="float32"):
  scfg, sparams = models.student_from_teacher(tparams, tcfg, every=5)
  scfg = scfg.replace(scan_unroll=scfg.num_layers)  # the engine's student.unroll_layers default
  if precision == "bfloat16":  # As the engine's teacher.param_dtype/dtype and student.dtype.
    scfg = scfg.replace(dtype="bfloat16")
    tcfg = tcfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    tparams = jax.tree.map(lambda x: x.astype(jnp.bfloat16), tparams)
  objective = losses.build_objective({"generalized_jsd": {"beta": 0.5, "fused": fused}})
  opt, sched = train.make_optimizer({"lr": lr, "warmup_steps": 0, "clip_norm": 0.0,
                                     "weight_decay": 0.0}, 1000)
  state = jax.jit(lambda p: train.init_state(p, opt, objective))(sparams)  # fresh buffers
  step = jax.jit(train.make_train_step(student_config=scfg, teacher_config=tcfg,
                                       objective=objective, optimizer=opt, schedule=sched),
                 donate_argnums=0)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  compiled = step.lower(state, batch, jax.random.key(0), tparams).compile()
  mem = compiled.memory_analysis()

  def run(state):
    state, metrics = compiled(state, batch, jax.random.key(0), tparams)
    jax.block_until_ready(metrics)
    return state, float(metrics["loss/total"])

  return scfg, state, run, mem


def torch_step(model_path, tcfg, batch_np, lr, precision="float32", device="cpu"):
  """The PyTorch loop's step: ``run(_) -> (None, loss)``.

  ``model_path``: the teacher's GGUF file or Hugging Face directory; ``device``: where PyTorch
  runs (``"cpu"``, ``"cuda"``; bench/device_check.py runs it on the GPU).
  """
  import torch
  import transformers
  where = ({"pretrained_model_name_or_path": model_path} if os.path.isdir(model_path) else
           {"pretrained_model_name_or_path": os.path.dirname(model_path),
            "gguf_file": os.path.basename(model_path)})
  teacher = transformers.AutoModelForCausalLM.from_pretrained(
      **where, torch_dtype=torch.float32).eval()
  cfg = teacher.config.to_dict()
  keep = models.layers_every(tcfg.num_layers, 5)
  scfg = transformers.LlamaConfig(**{**cfg, "num_hidden_layers": len(keep)})
  student = transformers.LlamaForCausalLM(scfg)
  sd = teacher.state_dict()
  new = {}
  for k, v in sd.items():
    if k.startswith("model.layers."):
      i = int(k.split(".")[2])
      if i in keep:
        new[k.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)] = v.clone()
    else:
      new[k] = v.clone()
  student.load_state_dict(new, strict=False)
  teacher.to(device)
  student.to(device).train()
  opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
  tokens = torch.tensor(batch_np["tokens"], device=device)
  labels = torch.tensor(batch_np["labels"], device=device)
  mask = labels != -100

  def gjsd(student_logits, teacher_logits, beta=0.5):  # TRL's generalized_jsd_loss formula.
    s = torch.log_softmax(student_logits, -1)
    t = torch.log_softmax(teacher_logits, -1)
    b = torch.tensor(beta, device=device)
    m = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), 0)
    kl_t = torch.nn.functional.kl_div(m, t, reduction="none", log_target=True)
    kl_s = torch.nn.functional.kl_div(m, s, reduction="none", log_target=True)
    per = (b * kl_t + (1 - b) * kl_s).sum(-1)
    return per[mask].mean()

  low = precision == "bfloat16"
  if low:
    teacher = teacher.to(torch.bfloat16)

  def run(_):
    with torch.no_grad():
      t_logits = teacher(tokens).logits.float()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=low):
      s_logits = student(tokens).logits
    loss = gjsd(s_logits.float(), t_logits)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return None, loss.item()

  return run


def main():
  tuned = runtime.tune_host_allocator()  # as jkd's entry points do; PyTorch here shares it
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                      help="both frameworks' compute precision (see the module docstring)")
  parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count()}),
                      help="PyTorch thread counts to probe; the faster one is timed")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args = parser.parse_args()
  load_start = os.getloadavg()[0]
  path = gguf_io.smollm2_gguf_path()
  tcfg, tparams = gguf_io.load_gguf(path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tcfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  labels = np.roll(tokens, -1, 1)
  labels[:, -1] = -100
  batch = {"tokens": tokens, "labels": labels}
  peak = matmul_peak(dtype=args.precision)
  scfg, state, jrun, mem = jkd_step(tcfg, tparams, batch, 1e-4, precision=args.precision)
  _, fstate, frun, fmem = jkd_step(tcfg, tparams, batch, 1e-4, fused=True,
                                   precision=args.precision)
  runs = {"jkd": jrun, "jkd fused": frun}
  if not args.no_torch:
    runs["pytorch"] = torch_step(path, tcfg, batch, 1e-4, args.precision)
  states = {"jkd": state, "jkd fused": fstate, "pytorch": None}
  for name, run in runs.items():  # Warm-up (compilation, allocator).
    states[name], _ = run(states[name])
  probe = {}
  if "pytorch" in runs:
    import torch  # noqa: PLC0415
    for n in args.threads:
      torch.set_num_threads(n)
      runs["pytorch"](None)  # One step to settle at this thread count, then the timed one.
      t0 = time.perf_counter()
      runs["pytorch"](None)
      probe[n] = time.perf_counter() - t0
    torch.set_num_threads(min(probe, key=probe.get))
  times = {name: [] for name in runs}
  for _ in range(args.steps):
    for name, run in runs.items():
      t0 = time.perf_counter()
      states[name], _ = run(states[name])
      times[name].append(time.perf_counter() - t0)
  tok = args.batch * args.seq
  flops = train.step_flops(scfg, tcfg, tok, args.seq)
  lines = [f"# Distillation step: SmolLM2-135M teacher (30 layers) -> 6-layer student,"
           f" batch {args.batch} x {args.seq} tokens, {PRECISION[args.precision]},"
           " generalized JSD + AdamW", "",
           f"machine: {os.cpu_count()} CPU cores, load average {load_start:.1f} at the start,"
           f" {os.getloadavg()[0]:.1f} at the end (other processes share the cores); jax"
           f" {jax.__version__}; measured {args.precision} matmul peak {peak / 1e9:.1f} GFLOP/s;"
           f" model FLOPs/step {flops / 1e9:.1f} G; {args.steps} interleaved timed steps each",
           "", f"host allocator: {ALLOCATOR[tuned]}", ""]
  if probe:
    import torch  # noqa: PLC0415
    lines += [f"PyTorch {torch.__version__} probe, threads: s/step = "
              + ", ".join(f"{n}: {t:.2f}" for n, t in probe.items())
              + f" (timed at {min(probe, key=probe.get)})", ""]
  lines += ["| implementation | s/step (median) | s/step (best) | tokens/s (median) | MFU |",
            "|---|---|---|---|---|"]
  rates = {}
  for name, ts in times.items():
    med = float(np.median(ts))
    rates[name] = tok / med
    lines.append(f"| {name} | {med:.3f} | {min(ts):.3f} | {tok / med:.0f} |"
                 f" {100 * flops / med / peak:.1f}% |")
  lines.append("")
  if "pytorch" in rates:
    lines.append(f"jkd / PyTorch tokens/s: {rates['jkd'] / rates['pytorch']:.2f}x (full logits),"
                 f" {rates['jkd fused'] / rates['pytorch']:.2f}x (fused loss, the same"
                 " objective chunked over tokens); target >= 1.5x")
  for name, m in (("jkd", mem), ("jkd fused", fmem)):
    lines.append(f"{name} compiled step memory (memory_analysis): temp"
                 f" {m.temp_size_in_bytes / 2**30:.2f} GiB, arguments"
                 f" {m.argument_size_in_bytes / 2**30:.2f} GiB")
  print("\n".join(lines))
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
