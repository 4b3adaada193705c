"""A run saved on one mesh resumes on another mesh shape and device count: 8 simulated CPU
devices as (8, 1, 1), then (2, 2, 2), then 4 devices. Every restored array equals the stored one
bit for bit, the restored data position serves the next batch of an uninterrupted run, and the
continued run follows the uninterrupted one (tests/mesh_resume.py runs each stage)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

from jkd.train.writer import read_metrics

HERE = pathlib.Path(__file__).resolve().parent


def stage(devices: int, *args) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, str(HERE / "mesh_resume.py"), *map(str, args)],
                        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def check(devices: int, workdir, mesh) -> dict:
  return json.loads(stage(devices, "check", workdir, json.dumps(mesh)).strip().splitlines()[-1])


def losses(workdir) -> dict[int, float]:
  return {m["step"]: m["loss/total"] for m in read_metrics(str(workdir)) if "loss/total" in m}


def test_resume_on_another_mesh_and_device_count(tmp_path):
  straight, moved = tmp_path / "straight", tmp_path / "moved"
  stage(8, "train", straight, json.dumps([8, 1, 1]), 12)  # Uninterrupted.
  stage(8, "train", moved, json.dumps([8, 1, 1]), 4)

  on_222 = check(8, moved, [2, 2, 2])
  assert on_222["step"] == 4 and on_222["devices"] == 8
  assert on_222["arrays_equal"] and on_222["arrays"] > 10 and on_222["same_next_batch"], on_222
  assert on_222["specs"]["q"] != check(8, moved, [8, 1, 1])["specs"]["q"]  # Really resharded.
  stage(8, "train", moved, json.dumps([2, 2, 2]), 8)

  on_4 = check(4, moved, [-1, 1, 1])
  assert on_4["step"] == 8 and on_4["devices"] == 4
  assert on_4["arrays_equal"] and on_4["same_next_batch"], on_4
  stage(4, "train", moved, json.dumps([2, 1, 2]), 12)

  want, got = losses(straight), losses(moved)
  assert sorted(got) == sorted(want) == list(range(1, 13))
  # Other meshes reduce in another order: the same run to float32 rounding.
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=5e-5)
  assert [got[s] for s in range(1, 5)] == [want[s] for s in range(1, 5)]  # Same mesh: exact.
