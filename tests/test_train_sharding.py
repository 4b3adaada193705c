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
  single = results.pop("single")
  assert len(results) == 4
  assert len(single) == 3
  for shape, steps in results.items():
    assert len(steps) == len(single), shape
    for ref, got in zip(single, steps):
      assert ref.keys() == got.keys()
      for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {k}")
  # Training moved the loss (so the comparison is not between constants).
  assert single[-1]["loss/total"] != single[0]["loss/total"]


def test_mesh_errors():
  import jax
  with pytest.raises(ValueError, match="needs 4 devices but 1 are available"):
    train.make_mesh((2, 2, 1), jax.devices()[:1])
  with pytest.raises(ValueError, match="at most one -1"):
    train.make_mesh((-1, -1, 1))
