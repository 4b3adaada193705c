"""Run by tests/test_train_sharding.py in a subprocess with 8 simulated CPU devices.

Trains a tiny student for 3 steps on each mesh and prints the per-step metrics as JSON.
"""

import json
import sys

import jax

from jkd import train
from tiny_run import three_steps, tiny_step


PLAIN = {"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1}
#: The fused (chunked) terms, 4 tokens per chunk and device, under gradient accumulation.
FUSED = {"generalized_jsd": {"beta": 0.5, "fused": True, "chunk_size": 4},
         "cross_entropy": {"weight": 0.1, "fused": True, "chunk_size": 4}}


def run(mesh_shape, devices, objective=PLAIN, **kwargs):
  mesh = train.make_mesh(mesh_shape, devices)
  state, tparams, step, bs, toks, labels = tiny_step(mesh, objective, **kwargs)
  batch = jax.device_put({"tokens": toks, "labels": labels}, bs)
  return three_steps(state, step, batch, tparams)


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  results = {"single": run((1, 1, 1), jax.devices()[:1])}
  for shape in ((8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)):
    results[str(shape)] = run(shape, jax.devices())
  # The engine's form: activation sharding constraints, the fused loss chunked within each
  # device's rows, gradient accumulation splitting each device's rows (16 rows, 2 per device).
  engine = dict(objective=FUSED, grad_accum=2, constrained=True, rows=16)
  results["engine single"] = run((1, 1, 1), jax.devices()[:1], **engine)
  for shape in ((8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)):
    results[f"engine {shape}"] = run(shape, jax.devices(), **engine)
  json.dump(results, sys.stdout)
