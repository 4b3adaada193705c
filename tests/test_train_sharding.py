"""Sharded train steps equal the unsharded one (8 simulated CPU devices, in a subprocess)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jkd import train

HERE = pathlib.Path(__file__).resolve().parent


def test_meshes_give_the_same_metrics_as_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(HERE / "multidevice_train.py")], env=env,
                        capture_output=True, text=True, timeout=600, cwd=HERE.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  samples = results.pop("sampler")
  teachers = results.pop("teachers")  # Several teachers (jkd.train.teachers), gate-mixed.
  reference = teachers.pop("single")
  assert len(teachers) == 1 and reference[-1]["loss/total"] != reference[0]["loss/total"]
  assert reference[-1]["teachers/share/0"] != 0.5  # The gate moved.
  for shape, steps in teachers.items():
    for ref, got in zip(reference, steps, strict=True):
      assert ref.keys() == got.keys()
      for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6,
                                   err_msg=f"teachers {shape} {k}")
  assert len(samples) == 3 and all(s == samples["(1, 1, 1)"] for s in samples.values()), samples
  assert len(set(map(tuple, samples["(1, 1, 1)"]))) > 1  # Different prompts, different tokens.
  references = {"": results.pop("single"), "engine ": results.pop("engine single")}
  assert len(results) == 8
  for shape, steps in results.items():
    single = references["engine " if shape.startswith("engine ") else ""]
    assert len(single) == 3 and len(steps) == len(single), shape
    for ref, got in zip(single, steps):
      assert ref.keys() == got.keys()
      for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {k}")
  # Training moved the loss (so the comparison is not between constants).
  for single in references.values():
    assert single[-1]["loss/total"] != single[0]["loss/total"]


def test_mesh_errors():
  import jax
  with pytest.raises(ValueError, match="needs 4 devices but 1 are available"):
    train.make_mesh((2, 2, 1), jax.devices()[:1])
  with pytest.raises(ValueError, match="at most one -1"):
    train.make_mesh((-1, -1, 1))


def test_gradient_accumulation_equals_one_batch():
  """Micro-batches of each device's rows (rows j, j+2, ...) average to the whole batch's
  gradient when every row counts the same tokens: same losses and updates over 3 steps."""
  import jax

  from tiny_run import three_steps, tiny_step

  mesh = train.make_mesh((1, 1, 1), jax.devices()[:1])
  runs = {}
  for accum in (1, 2, 4):
    state, tparams, step, bs, toks, labels = tiny_step(
        mesh, {"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1}, grad_accum=accum,
        constrained=True)
    runs[accum] = three_steps(state, step, jax.device_put(
        {"tokens": toks, "labels": labels}, bs), tparams)
  for accum in (2, 4):
    for ref, got in zip(runs[1], runs[accum]):
      for k in ("loss/total", "train/grad_norm", "train/tokens"):
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, err_msg=f"grad_accum {accum} {k}")
  assert runs[1][-1]["loss/total"] != runs[1][0]["loss/total"]


def test_gradient_accumulation_must_split_each_devices_rows():
  from jax.sharding import AbstractMesh

  from jkd.train import setup as setup_lib

  cfg = train.default_config()
  cfg.data.batch_size, cfg.train.grad_accum = 8, 2
  mesh = AbstractMesh((2, 4, 1), train.MESH_AXES)
  with pytest.raises(ValueError, match=r"train.grad_accum 2 does not split the 1 rows each"
                     r" device holds .* multiple of 16"):
    setup_lib.check_batch(cfg, mesh, train.DEFAULT_RULES)
  cfg.data.batch_size = 16
  setup_lib.check_batch(cfg, mesh, train.DEFAULT_RULES)
