"""Run by tests/test_train_sharding.py in a subprocess with 8 simulated CPU devices.

Trains a tiny student for 3 steps on each mesh and prints the per-step metrics as JSON.
"""

import json
import sys

import jax

from jkd import train
from tiny_run import three_steps, tiny_step


def run(mesh_shape, devices):
  mesh = train.make_mesh(mesh_shape, devices)
  state, tparams, step, bs, toks, labels = tiny_step(
      mesh, {"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1})
  batch = jax.device_put({"tokens": toks, "labels": labels}, bs)
  return three_steps(state, step, batch, tparams)


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  results = {"single": run((1, 1, 1), jax.devices()[:1])}
  for shape in ((8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)):
    results[str(shape)] = run(shape, jax.devices())
  json.dump(results, sys.stdout)
