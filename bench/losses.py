"""Fused (chunked) vs unfused distillation loss: compiled memory and time of loss + gradient.

    python bench/losses.py                 # SmolLM2 shape timing + memory at both shapes
    python bench/losses.py --quick         # small shapes, for a smoke run
    python bench/losses.py --tpu v5e       # Llama-3 bf16 memory from libtpu's TPU compiler

Memory is ``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``: exact, and
independent of what else runs on the machine. Times are medians of interleaved repeats of the two
forms in the same process, so the ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses


def forms(divergence: str, chunk_size: int):
  """``{"fused": ..., "unfused": ...}``: jitted loss + gradient (student hidden and head) of
  ``(hs, ws, ht, wt)``, ``[N, H], [H, V]`` each for student and teacher."""
  def fused(hs, ws, ht, wt):
    return losses.fused_linear_divergence(hs, ws, ht, wt, divergence=divergence,
                                          chunk_size=chunk_size)[0]

  def unfused(hs, ws, ht, wt):
    zs = jnp.dot(hs, ws, preferred_element_type=jnp.float32)
    zt = jax.lax.stop_gradient(jnp.dot(ht, wt, preferred_element_type=jnp.float32))
    return losses.masked_mean(losses.full_divergence(divergence, zs, zt))

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
  return {"fused": grad(fused), "unfused": grad(unfused)}


def shapes(n, h, v, dtype):
  s = jax.ShapeDtypeStruct
  return s((n, h), dtype), s((h, v), dtype), s((n, h), dtype), s((h, v), dtype)


def memory(n, h, v, dtype, divergence, chunk_size, device=None):
  """Compiled temporaries of each form; ``device``: compile for it (e.g. a TPU chip of
  ``jax.experimental.topologies``) instead of this machine's default device."""
  out = {}
  place = (lambda s: s) if device is None else (lambda s: jax.ShapeDtypeStruct(
      s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device)))
  for name, fn in forms(divergence, chunk_size).items():
    structs = [place(s) for s in shapes(n, h, v, dtype)]
    m = fn.lower(*structs).compile().memory_analysis()
    out[name] = m.temp_size_in_bytes
  return out


def tpu_memory(chip: str, divergence: str, chunk_sizes) -> list[dict]:
  """The Llama-3 bfloat16 shape's temporaries compiled by libtpu's compiler for one ``chip``
  (``v5e``, ``v6e``, ...), per chunk size: no TPU needed, ``pip install "jax[tpu]"``."""
  from jax.experimental import topologies  # noqa: PLC0415
  device = topologies.get_topology_desc(
      platform="tpu", topology_name=f"{chip}:1x1", chip_config_name="default",
      chips_per_host_bounds=(1, 1, 1), num_slices=1).devices[0]
  rows = []
  for chunk in chunk_sizes:
    mem = memory(8192, 4096, 128256, jnp.bfloat16, divergence, chunk, device=device)
    rows.append({"chip": chip, "chunk_size": chunk, "fused_temp_bytes": mem["fused"],
                 "unfused_temp_bytes": mem["unfused"],
                 "memory_ratio": mem["fused"] / mem["unfused"]})
  return rows


def timing(n, h, v, dtype, divergence, chunk_size, repeats):
  keys = jax.random.split(jax.random.key(0), 4)
  args = [jax.random.normal(k, s.shape, s.dtype) * (0.05 if i % 2 else 1.0)
          for i, (k, s) in enumerate(zip(keys, shapes(n, h, v, dtype)))]
  fns = forms(divergence, chunk_size)
  compiled = {name: fn.lower(*args).compile() for name, fn in fns.items()}
  times = {name: [] for name in fns}
  values = {}
  for name, c in compiled.items():  # Warm-up, and the values for the parity column.
    values[name] = jax.block_until_ready(c(*args))
  for _ in range(repeats):
    for name, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      times[name].append(time.perf_counter() - t0)
  (lf, (ghf, gwf)), (lu, (ghu, gwu)) = values["fused"], values["unfused"]
  parity = {"loss_abs_diff": float(abs(lf - lu)),
            "grad_head_max_abs_diff": float(jnp.max(jnp.abs(gwf - gwu))),
            "grad_hidden_max_abs_diff": float(jnp.max(jnp.abs(ghf - ghu)))}
  return {name: float(np.median(t)) for name, t in times.items()}, parity


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
  parser.add_argument("--divergence", default="generalized_jsd")
  parser.add_argument("--chunk_size", type=int, default=losses.DEFAULT_CHUNK_SIZE)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results to this file")
  parser.add_argument("--tpu", help="only the Llama-3 bf16 memory, compiled for this TPU chip"
                      " (v5e, v6e, ...) by libtpu's compiler, at chunk sizes 256-2048")
  args = parser.parse_args()
  if args.tpu:
    rows = tpu_memory(args.tpu, args.divergence, (256, 512, 1024, 2048))
    print(f"# jkd.losses fused vs unfused on one {args.tpu} chip (libtpu's compiler):"
          f" {args.divergence}, loss + grad, N, H, V = 8192, 4096, 128256, bfloat16\n")
    print("| chunk_size | fused temp | unfused temp | fused/unfused memory |\n|---|---|---|---|")
    for r in rows:
      print(f"| {r['chunk_size']} | {r['fused_temp_bytes'] / 2**30:.2f} GiB |"
            f" {r['unfused_temp_bytes'] / 2**30:.2f} GiB | {100 * r['memory_ratio']:.1f}% |")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    return

  if args.quick:
    smol, llama = (1024, 64, 4096), (1024, 128, 8192)
  else:
    smol, llama = (8192, 576, 49152), (8192, 4096, 128256)
  rows = []
  for label, shape, dtype in [("SmolLM2", smol, jnp.float32), ("Llama-3", llama, jnp.float32),
                              ("Llama-3", llama, jnp.bfloat16)]:
    mem = memory(*shape, dtype, args.divergence, args.chunk_size)
    rows.append({"shape": label, "N,H,V": shape, "dtype": jnp.dtype(dtype).name,
                 "fused_temp_bytes": mem["fused"], "unfused_temp_bytes": mem["unfused"],
                 "memory_ratio": mem["fused"] / mem["unfused"]})
  t, parity = timing(*smol, jnp.float32, args.divergence, args.chunk_size, args.repeats)
  rows[0].update(fused_s=t["fused"], unfused_s=t["unfused"], time_ratio=t["fused"] / t["unfused"],
                 **parity)

  print(f"# jkd.losses fused vs unfused: {args.divergence}, loss + grad, chunk {args.chunk_size}")
  print(f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind},"
        f" jax {jax.__version__}\n")
  print("| shape | N, H, V | dtype | fused temp | unfused temp | fused/unfused memory |"
        " fused s | unfused s | fused/unfused time |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    time_cols = (f"{r['fused_s']:.2f} | {r['unfused_s']:.2f} | {r['time_ratio']:.2f}x"
                 if "fused_s" in r else "- | - | -")
    print(f"| {r['shape']} | {', '.join(map(str, r['N,H,V']))} | {r['dtype']} |"
          f" {gib(r['fused_temp_bytes'])} | {gib(r['unfused_temp_bytes'])} |"
          f" {100 * r['memory_ratio']:.1f}% | {time_cols} |")
  print(f"\nparity at the SmolLM2 shape: |loss diff| {rows[0]['loss_abs_diff']:.2e}, max |grad"
        f" head diff| {rows[0]['grad_head_max_abs_diff']:.2e}, max |grad hidden diff|"
        f" {rows[0]['grad_hidden_max_abs_diff']:.2e}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
  main()
