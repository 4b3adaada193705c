"""The engine on a (1, 2, 2) mesh of 4 simulated CPU devices: fsdp- and tensor-sharded state,
the same numbers as one device, and a resume onto another mesh."""

from __future__ import annotations

import signal

import numpy as np
import orbax.checkpoint as ocp

from test_train_loop import (checkpoint_steps, exact, finish, last_step,  # noqa: F401
                             reference, run_to_end, shared, start, wait_for)

FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def assert_close_to(workdir, reference, rtol=5e-5, *, prefix=False):  # noqa: F811
  """The metrics of ``workdir`` equal the reference run's to ``rtol`` (``prefix``: the run was
  cut short; compare the lines it has)."""
  got, want = exact(workdir), exact(reference)
  if prefix:
    have = {(m["step"], tuple(sorted(m))) for m in got}
    want = [m for m in want if (m["step"], tuple(sorted(m))) in have]
  assert [m["step"] for m in got] == [m["step"] for m in want]
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w)
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=1e-6, err_msg=f"{k} step {w['step']}")


def test_sharded_run_matches_one_device_and_resumes_on_another_mesh(shared, reference,  # noqa: F811
                                                                     tmp_path):
  workdir = tmp_path / "run"
  proc = start(shared, workdir, "--config.mesh.shape=(1,2,2)", env=FOUR_DEVICES)
  wait_for(proc, lambda: last_step(workdir) >= 6, "step 6")
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == 0, err[-3000:]
  stopped = int(out.strip().split()[-1])
  assert stopped in checkpoint_steps(workdir)
  with ocp.StandardCheckpointer() as c:
    tree = c.metadata(str(workdir / "checkpoints" / str(stopped) / "state")).item_metadata.tree
  specs = {name: tuple(leaf.sharding.partition_spec) for name, leaf in (
      ("q", tree["params"]["layers"]["attn"]["q"]["kernel"]),
      ("mu_up", tree["opt_state"][1][0]["mu"]["layers"]["mlp"]["up"]["kernel"]),
      ("embed", tree["params"]["embed"]["embedding"]))}
  assert specs == {"q": (None, "fsdp", "tensor", None), "mu_up": (None, "fsdp", "tensor"),
                   "embed": ("tensor", "fsdp")}
  # Resume the (1, 2, 2)-sharded checkpoint on a (4, 1, 1) data-parallel mesh.
  run_to_end(shared, workdir, "--config.mesh.shape=(4,1,1)", env=FOUR_DEVICES)
  assert_close_to(workdir, reference)
