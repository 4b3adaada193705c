"""jkd.train.setup: a run built from its config with shapes only, lowered and compiled; and
``train()`` returning the final state."""

from __future__ import annotations

import jax
import numpy as np

from jkd.data import ArraySource, synthetic_lm_examples
from jkd.train import checkpoint
from jkd.train import loop
from jkd.train.setup import setup
from test_train_loop import tiny_config


def test_setup_builds_abstract_state_and_compiles_without_weights():
  cfg = tiny_config()
  run = setup(cfg)
  leaves = jax.tree.leaves(run.abstract_state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert all(x.sharding is not None for x in leaves)
  # The student of every 2nd teacher layer: 2 of the 4 layers, the teacher's widths.
  assert run.student_config.num_layers == 2
  assert run.abstract_state.params["embed"]["embedding"].shape == (128, 32)
  teacher = run.abstract_teacher()
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(teacher))
  b, t = int(cfg.data.batch_size), int(cfg.data.seq_len)
  compiled = run.lower({"tokens": (b, t), "labels": (b, t)}).compile()
  memory = compiled.memory_analysis()
  assert memory is not None and memory.argument_size_in_bytes > 0
  # The abstract state is the one a real run creates: same tree, shapes and dtypes.
  shapes = jax.eval_shape(lambda: run.abstract_state)
  assert jax.tree.structure(shapes) == jax.tree.structure(run.abstract_state)


def test_train_returns_the_final_state(tmp_path):
  cfg = tiny_config()
  cfg.train.steps = 3
  cfg.checkpoint.every = 0
  ex = synthetic_lm_examples(16, int(cfg.data.seq_len), 128, seed=0)
  result = loop.train(cfg, str(tmp_path), train_source=ArraySource(ex, 8, seed=0))
  state = result["state"]
  assert result["step"] == 3 and int(state.step) == 3
  # The state is the saved one: the last checkpoint holds the same student parameters.
  run = setup(cfg)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          run.abstract_state.params)
  saved = checkpoint.restore_params(str(tmp_path), abstract)
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
