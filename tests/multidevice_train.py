"""Run by tests/test_train_sharding.py in a subprocess with 8 simulated CPU devices.

Trains a tiny student for 3 steps on each mesh and prints the per-step metrics as JSON.
"""

import json
import sys

import jax

from jkd import train
from tiny_run import teachers_step, three_steps, tiny_step


PLAIN = {"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1}
#: The fused (chunked) terms, 4 tokens per chunk and device, under gradient accumulation.
FUSED = {"generalized_jsd": {"beta": 0.5, "fused": True, "chunk_size": 4},
         "cross_entropy": {"weight": 0.1, "fused": True, "chunk_size": 4}}


def run(mesh_shape, devices, objective=PLAIN, **kwargs):
  mesh = train.make_mesh(mesh_shape, devices)
  state, tparams, step, bs, toks, labels = tiny_step(mesh, objective, **kwargs)
  batch = jax.device_put({"tokens": toks, "labels": labels}, bs)
  return three_steps(state, step, batch, tparams)


def run_teachers(mesh_shape, devices):
  """Two teachers of different shapes mixed by a learned gate (jkd.train.teachers)."""
  mesh = train.make_mesh(mesh_shape, devices)
  state, tparams, step, bs, toks, labels = teachers_step(mesh)
  batch = jax.device_put({"tokens": toks, "labels": labels}, bs)
  return three_steps(state, step, batch, tparams)


def sample(mesh_shape):
  from jkd import models, partitioning, sampling  # pylint: disable=import-outside-toplevel
  devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else jax.devices()
  mesh = train.make_mesh(mesh_shape, devices)
  config = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2)
  params = models.init_params(config, jax.random.key(0))
  shardings = train.shardings_for(jax.eval_shape(lambda: params), models.param_axes(config),
                                  mesh)
  params = jax.device_put(params, shardings)
  prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13], [14, 15, 16], [17, 18]]
  with partitioning.activation_sharding(mesh, train.DEFAULT_RULES):
    out = sampling.generate(params, prompts, config=config, key=None, greedy=True,
                            max_new_tokens=6)
  return [[int(t) for t in row] for row in jax.device_get(out.tokens)]


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
  # The sampler traced inside the activation constraints (as the on-policy source runs it),
  # greedy: the same tokens on one device and on sharded meshes.
  results["sampler"] = {str(shape): sample(shape) for shape in ((1, 1, 1), (8, 1, 1), (2, 2, 2))}
  # Several teachers, each in its own shardings, mixed by a gate: the same numbers sharded.
  results["teachers"] = {"single": run_teachers((1, 1, 1), jax.devices()[:1])}
  results["teachers"]["(2, 2, 2)"] = run_teachers((2, 2, 2), jax.devices())
  json.dump(results, sys.stdout)
