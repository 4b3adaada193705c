"""jkd.train.checkpoint: round trip, retention (newest K + best), foreign shapes, damage."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd.train import checkpoint as ckpt_lib

DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def state(scale=1.0, layers=2):
  return {"step": jnp.asarray(3, jnp.int32),
          "params": {"layers": {"kernel": jnp.arange(layers * 6, dtype=jnp.float32).reshape(
              layers, 2, 3) * scale}, "embed": jnp.ones((5, 2)) * scale},
          "opt_state": {"mu": {"kernel": jnp.zeros((layers, 2, 3))}}}


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=DEVICE), tree)


def files(directory):
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_round_trip_of_state_data_and_config(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2, config={"lr": 0.1, "name": "x"})
  assert ck.restore(abstract(state())) is None
  assert ck.save(7, state(2.0), {"epoch": 1, "index": 4})
  assert not ck.save(7, state(3.0), {"epoch": 9, "index": 9})  # already saved: no-op
  ck.wait()
  step, restored, data, config = ck.restore(abstract(state()))
  assert (step, data, config) == (7, {"epoch": 1, "index": 4}, {"lr": 0.1, "name": "x"})
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state(2.0))):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == DEVICE
  ck.close()


@pytest.mark.parametrize("mode, best", [("min", 4), ("max", 2)])
def test_keeps_the_newest_and_the_best(tmp_path, mode, best):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2, best_metric="eval/loss",
                             best_mode=mode)
  values = {2: 0.5, 4: 0.1, 6: 0.3}
  for step in range(1, 8):
    metrics = {"eval/loss": values[step]} if step in values else None
    ck.save(step, state(), {}, metrics=metrics)
  ck.wait()
  assert ck.all_steps() == sorted({6, 7, best})
  ck.close()


def test_keep_last_only(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=3)
  for step in range(1, 6):
    ck.save(step, state(), {})
  ck.wait()
  assert ck.all_steps() == [3, 4, 5]
  ck.close()


def test_other_shapes_name_the_parameter_and_touch_nothing(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, state(layers=2), {})
  ck.wait()
  before = files(tmp_path / "ck")
  with pytest.raises(ValueError) as e:
    ck.restore(abstract(state(layers=3)))
  message = str(e.value)
  assert "params/layers/kernel: checkpoint (2, 2, 3) vs model (3, 2, 3)" in message
  assert message.index("params/layers/kernel") < message.index("opt_state/mu/kernel")
  assert str(tmp_path / "ck" / "1") in message
  missing = dict(state(), extra=jnp.zeros(2))
  with pytest.raises(ValueError, match="extra: missing in the checkpoint"):
    ck.restore(abstract(missing))
  assert files(tmp_path / "ck") == before
  ck.close()


def test_unreadable_checkpoint_is_reported_and_kept(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, state(), {})
  ck.wait()
  ck.close()
  for root, _, names in os.walk(tmp_path / "ck" / "1" / "state"):
    for name in names:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"not a checkpoint")
  before = files(tmp_path / "ck")
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  with pytest.raises(ckpt_lib.CheckpointError, match="cannot be read.*left untouched.*mv"):
    ck.restore(abstract(state()))
  ck.close()
  assert files(tmp_path / "ck") == before


def test_find_checkpoint_and_restore_params(tmp_path):
  workdir = tmp_path / "run"
  ck = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), config={"student_model": {"a": 1}})
  ck.save(2, state(1.0), {})
  ck.save(5, state(4.0), {})
  ck.wait()
  ck.close()
  newest = str(workdir / "checkpoints" / "5")
  for path in (workdir, workdir / "checkpoints", newest):
    assert ckpt_lib.find_checkpoint(str(path)) == newest
  assert ckpt_lib.read_config(str(workdir)) == {"student_model": {"a": 1}}
  params = ckpt_lib.restore_params(str(workdir), abstract(state()["params"]))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state(4.0)["params"])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r"params/layers/kernel: checkpoint \(2, 2, 3\) vs model"):
    ckpt_lib.restore_params(str(workdir), abstract(state(layers=1)["params"]))
  with pytest.raises(FileNotFoundError, match="no jkd checkpoint"):
    ckpt_lib.find_checkpoint(str(tmp_path / "nothing"))
