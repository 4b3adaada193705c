"""``jkd.plan``: a run's step compiled from shapes alone for a topology, with memory per chip
checked against an independent count of the parameters, the exit status of a step that does not
fit, bad topology names; and, where libtpu is installed, the real TPU compiler on a v5e slice."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jkd import models
from jkd import plan as plan_lib
from jkd.train import build
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def param_bytes(config) -> int:
  """float32 bytes of a model's parameters, counted from their shapes."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  return sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(shapes))


def tiny():
  cfg = load_config("kd_tiny")
  cfg.data.batch_size = 8
  return cfg


def test_plan_on_one_cpu_device_counts_the_parameters():
  cfg = tiny()
  report = plan_lib.plan(cfg, "cpu:1", hbm_gib=1.0)
  m = report["per_chip_bytes"]
  teacher = build.teacher_spec(cfg).config
  student = build.student_config(cfg, teacher)
  assert m["student_params"] == param_bytes(student)
  assert m["teacher_params"] == param_bytes(teacher)
  assert m["optimizer_state"] >= 2 * m["student_params"]  # Adam's two moments, at least.
  assert m["arguments"] >= m["student_params"] + m["optimizer_state"] + m["teacher_params"]
  assert m["total"] >= m["arguments"] and report["fits"] and report["flops_per_chip"] > 0
  assert "student params" in plan_lib.format_report(report)


def test_cli_exit_status_when_the_step_does_not_fit(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "jkd.plan", "--config", os.path.join(ROOT, "configs", "kd_tiny.py"),
       "--topology", "cpu:1", "--hbm_gib", "0.0001"], capture_output=True, text=True,
      timeout=300, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == plan_lib.EXIT_DOES_NOT_FIT, done.stderr[-3000:]
  assert "does not fit" in done.stdout
  assert "error: the step needs" in done.stderr and "teacher.param_dtype=bfloat16" in done.stderr


@pytest.mark.parametrize("name, message", [
    ("v7x-8", "unknown topology 'v7x-8'"), ("v5e-3", r"v5e slices come in sizes \[1, 4"),
    ("v4-6", "two per chip"), ("v5e:4x4x4", "v5e slices are 2-D"),
    ("cpu:64", "CPU devices here"),
])
def test_bad_topologies(name, message):
  with pytest.raises(ValueError, match=message):
    plan_lib.topology_devices(name)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install 'jax[tpu]'): the TPU compiler")
def test_plan_for_a_v5e_slice_with_the_tpu_compiler():
  cfg = tiny()
  cfg.mesh.shape = (1, 4, 1)
  report = plan_lib.plan(cfg, "v5e-4")
  assert report["devices"] == 4 and report["fits"] and report["hbm_bytes"] == 16 * 2**30
  teacher = build.teacher_spec(cfg).config
  student = build.student_config(cfg, teacher)
  # Sharded over fsdp=4: each chip holds about a quarter (uneven axes round up).
  assert param_bytes(student) / 4 <= report["per_chip_bytes"]["student_params"] < param_bytes(
      student) / 2
  assert 0 < report["mfu_bound"] <= 1 and report["step_time_bound_s"] > 0
