"""DPO from hidden states: compiled memory (and time) of loss + gradient, fused vs unfused.

    python bench/preference.py            # 8 pairs x 1024 tokens, H=576, V=49152 (SmolLM2)
    python bench/preference.py --quick    # small shapes

The fused form is :func:`jkd.losses.fused_sequence_logprobs` (chunked over tokens, policy and
reference in one call); the unfused form materialises ``[2B, T, V]`` logits of both models.
Memory is ``memory_analysis().temp_size_in_bytes`` of the compiled loss + gradient: exact.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses


def _split(lp):
  b = lp.sum.shape[0] // 2
  return jax.tree.map(lambda a: a[:b], lp), jax.tree.map(lambda a: a[b:], lp)


def _fns(chunk_size):
  def fused(h, w, hr, wr, labels):
    pol, ref = losses.fused_sequence_logprobs(h, w, labels, reference_hidden=hr,
                                              reference_head=wr, chunk_size=chunk_size)
    return jnp.mean(losses.preference_loss(*_split(pol), *_split(ref), beta=0.1))

  def unfused(h, w, hr, wr, labels):
    pol = losses.sequence_logprobs(jnp.dot(h, w, preferred_element_type=jnp.float32), labels)
    ref = jax.lax.stop_gradient(
        losses.sequence_logprobs(jnp.dot(hr, wr, preferred_element_type=jnp.float32), labels))
    return jnp.mean(losses.preference_loss(*_split(pol), *_split(ref), beta=0.1))

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))  # noqa: E731
  return {"fused": grad(fused), "unfused": grad(unfused)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--chunk_size", type=int, default=losses.DEFAULT_CHUNK_SIZE)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  pairs, t, h, v = (2, 128, 64, 4096) if args.quick else (8, 1024, 576, 49152)
  keys = jax.random.split(jax.random.key(0), 5)
  inputs = (jax.random.normal(keys[0], (2 * pairs, t, h)),
            0.05 * jax.random.normal(keys[1], (h, v)),
            jax.random.normal(keys[2], (2 * pairs, t, h)),
            0.05 * jax.random.normal(keys[3], (h, v)),
            jax.random.randint(keys[4], (2 * pairs, t), 0, v).at[:, : t // 4].set(-100))
  fns = _fns(args.chunk_size)
  compiled = {n: f.lower(*inputs).compile() for n, f in fns.items()}
  mem = {n: c.memory_analysis().temp_size_in_bytes for n, c in compiled.items()}
  out = {n: jax.block_until_ready(c(*inputs)) for n, c in compiled.items()}
  times = {n: [] for n in compiled}
  for _ in range(args.repeats):
    for n, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*inputs))
      times[n].append(time.perf_counter() - t0)
  med = {n: float(np.median(ts)) for n, ts in times.items()}
  (lf, gf), (lu, gu) = out["fused"], out["unfused"]
  print(f"# DPO (sigmoid) loss + grad from hidden states: {pairs} pairs x {t} tokens, H={h},"
        f" V={v}, chunk {args.chunk_size}; {jax.devices()[0].device_kind}, jax {jax.__version__}\n")
  print("| form | temp memory | time (s) |\n|---|---|---|")
  for n in ("fused", "unfused"):
    print(f"| {n} | {mem[n] / 2**30:.3f} GiB | {med[n]:.2f} |")
  print(f"\nfused/unfused: memory {100 * mem['fused'] / mem['unfused']:.1f}%, time"
        f" {med['fused'] / med['unfused']:.2f}x; |loss diff| {abs(float(lf - lu)):.1e}, max |grad"
        f" head diff| {float(jnp.max(jnp.abs(gf[1] - gu[1]))):.1e}")


if __name__ == "__main__":
  main()
