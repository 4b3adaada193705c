"""Run by tests/test_train_resume_mesh.py in a subprocess with simulated CPU devices.

``python mesh_resume.py train WORKDIR MESH STEPS``: trains configs/kd_tiny.py on ``MESH`` to
``STEPS`` (resuming, with ``train.steps`` allowed to change). ``python mesh_resume.py check
WORKDIR MESH``: restores the newest checkpoint into ``MESH``'s shardings and prints, as JSON,
whether every array equals the stored one bit for bit, whether the restored data position
serves the batch an uninterrupted source serves next, and the restored shardings of two arrays.
"""

import json
import sys

import jax
import numpy as np

from jkd.data.source import as_batch_source
from jkd.train import checkpoint as ckpt_lib
from jkd.train import loop
from jkd.train import setup as setup_lib
from jkd.train import sources
from recipe_configs import load_config


def config(mesh, steps):
  cfg = load_config("kd_tiny")
  cfg.train.progress_bar = False
  cfg.mesh.shape = tuple(mesh)
  cfg.train.steps = steps
  cfg.checkpoint.every = 4
  cfg.optimizer.end_lr_ratio = 1.0  # A constant rate after warm-up: the step count can grow.
  return cfg


def restore(workdir, mesh, devices):
  """``(run, step, state, data state)`` of the newest checkpoint read into ``mesh``."""
  run = setup_lib.setup(config(mesh, 1), devices=devices)
  checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints")
  step, state, data_state, _ = checkpointer.restore(run.abstract_state)
  checkpointer.close()
  return run, step, state, data_state


def check(workdir, mesh):
  cfg = config(mesh, 1)
  run, step, state, data_state = restore(workdir, mesh, None)
  # The stored arrays whole, on one device: the reference the resharded ones must equal.
  _, _, whole, _ = restore(workdir, (1, 1, 1), jax.devices()[:1])
  leaves, stored = jax.tree.leaves(state), jax.tree.leaves(whole)
  equal = len(leaves) == len(stored) and all(
      np.array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)))
      for a, b in zip(leaves, stored))
  resumed, _ = sources.make_sources(cfg, run.teacher_spec.config.vocab_size)
  resumed = as_batch_source(resumed)
  resumed.set_state(data_state)
  fresh = as_batch_source(sources.make_sources(cfg, run.teacher_spec.config.vocab_size)[0])
  for _ in range(step):
    next(fresh)
  a, b = next(resumed), next(fresh)
  same_batch = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  specs = {name: f"{dict(leaf.sharding.mesh.shape)} {leaf.sharding.spec}" for name, leaf in (
      ("q", state.params["layers"]["attn"]["q"]["kernel"]),
      ("embed", state.params["embed"]["embedding"]))}
  print(json.dumps({"step": step, "devices": jax.device_count(), "arrays_equal": bool(equal),
                    "arrays": len(stored), "same_next_batch": bool(same_batch),
                    "specs": specs}))


if __name__ == "__main__":
  mode, workdir, mesh = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  if mode == "train":
    loop.train(config(mesh, int(sys.argv[4])), workdir, allow_config_change=["train.steps"])
  else:
    check(workdir, mesh)
