"""jkd.train.build: teacher and student sources, init_from, the frozen teacher, state shardings;
and ``python -m jkd.train --init_from``."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jkd import losses
from jkd import models
from jkd.train import build
from jkd.train import sharding
from jkd.train.step import make_optimizer
from jkd.train.writer import read_metrics
from test_train_loop import finish, reference, shared, start, tiny_config  # noqa: F401

MESH = sharding.make_mesh((-1, 1, 1))
RULES = sharding.DEFAULT_RULES


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unknown_sources_and_missing_paths_are_errors():
  with pytest.raises(ValueError, match=r"unknown teacher.source 'gguff'; choose one of \['gguf',"):
    build.teacher_spec(tiny_config(teacher__source="gguff"))
  with pytest.raises(ValueError, match="teacher.source=hf needs a path"):
    build.teacher_spec(tiny_config(teacher__source="hf"))
  cfg = tiny_config(student__source="hf")
  with pytest.raises(ValueError, match="student.source=hf needs a path"):
    build.student_config(cfg, build.teacher_spec(cfg).config)
  cfg = tiny_config(student__source="layer")
  with pytest.raises(ValueError, match="unknown student.source 'layer'"):
    build.student_config(cfg, build.teacher_spec(cfg).config)


def test_layers_and_random_students():
  cfg = tiny_config()
  spec = build.teacher_spec(cfg)
  teacher = build.build_teacher(spec, MESH, RULES, jax.random.key(0))
  student_cfg = build.student_config(cfg, teacher.config)
  assert student_cfg == teacher.config.replace(num_layers=2, scan_unroll=2)  # unroll_layers
  assert build.student_config(tiny_config(student__unroll_layers=False),
                              teacher.config).scan_unroll == 1
  shardings = build.param_shardings(student_cfg, MESH, RULES)
  params = build.student_params(cfg, student_cfg, teacher, shardings, jax.random.key(1))
  kept = jax.tree.map(lambda x: x[np.array([1, 3])], teacher.params["layers"])
  assert_trees_equal(params["layers"], kept)  # every 2nd layer: 1 and 3 (the last one kept)
  assert_trees_equal(params["embed"], teacher.params["embed"])

  cfg = tiny_config(student__source="random")
  cfg.student.model.num_layers, cfg.student.model.hidden_size = 1, 16
  student_cfg = build.student_config(cfg, teacher.config)
  assert (student_cfg.num_layers, student_cfg.hidden_size, student_cfg.vocab_size) == (
      1, 16, teacher.config.vocab_size)


def test_teacher_from_a_hugging_face_directory():
  path = os.path.join(os.path.dirname(__file__), "data", "tiny_llama")
  cfg = tiny_config(teacher__source="hf", teacher__path=path)
  spec = build.teacher_spec(cfg)
  config, params = models.load_hf(path)
  assert spec.config == config
  teacher = build.build_teacher(spec, MESH, RULES, jax.random.key(0))
  assert_trees_equal(teacher.params, params)
  assert jax.tree.map(lambda x: x.sharding, teacher.params) == teacher.shardings


def test_frozen_teacher_in_bf16_keeps_its_shardings():
  teacher = build.build_teacher(build.teacher_spec(tiny_config()), MESH, RULES,
                                jax.random.key(0))
  frozen = build.freeze_teacher(teacher, "bfloat16")
  assert frozen.config.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(frozen.params)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.tree.map(lambda x: x.sharding, frozen.params) == teacher.shardings
  np.testing.assert_allclose(np.asarray(frozen.params["embed"]["embedding"], np.float32),
                             teacher.params["embed"]["embedding"], rtol=1e-2)
  assert build.freeze_teacher(teacher, "float32") is teacher


def test_state_shardings_follow_the_parameters():
  cfg = tiny_config()
  student_cfg = build.student_config(cfg, build.teacher_spec(cfg).config)
  optimizer, _ = make_optimizer(cfg.optimizer.to_dict(), 10)
  objective = losses.build_objective(cfg.objective)
  abstract, shardings = build.state_shardings(student_cfg, optimizer, objective, MESH, RULES)
  adam = shardings.opt_state[1][0]
  assert isinstance(adam, optax.ScaleByAdamState)
  assert adam.mu == shardings.params and adam.nu == shardings.params
  assert abstract.params["embed"]["embedding"].sharding == shardings.params["embed"]["embedding"]
  params = build.student_params(cfg, student_cfg, build.build_teacher(
      build.teacher_spec(cfg), MESH, RULES, jax.random.key(0)), shardings.params,
                                jax.random.key(1))
  state = build.create_state(params, optimizer, objective, shardings)
  assert jax.tree.map(lambda x: x.sharding, state) == shardings


def test_init_from_a_jkd_checkpoint(reference):  # noqa: F811
  cfg = tiny_config(student__init_from=str(reference))
  cfg.student.source = "random"  # ignored: init_from decides
  teacher = build.build_teacher(build.teacher_spec(cfg), MESH, RULES, jax.random.key(0))
  student_cfg = build.student_config(cfg, teacher.config)
  assert student_cfg.num_layers == 2
  params = build.student_params(cfg, student_cfg, teacher,
                                build.param_shardings(student_cfg, MESH, RULES),
                                jax.random.key(1))
  with ocp.PyTreeCheckpointer() as c:
    stored = c.restore(str(reference / "checkpoints" / "24" / "state"))["params"]
  assert_trees_equal(params, stored)


def test_init_from_a_hugging_face_directory(tmp_path):
  cfg = tiny_config()
  hf_cfg = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                              num_layers=1, num_heads=4, num_kv_heads=2)
  hf_params = models.init_params(hf_cfg, jax.random.key(7))
  models.save_hf(str(tmp_path / "hf"), hf_params, hf_cfg)
  cfg.student.init_from = str(tmp_path / "hf")
  teacher = build.build_teacher(build.teacher_spec(cfg), MESH, RULES, jax.random.key(0))
  student_cfg = build.student_config(cfg, teacher.config)
  assert (student_cfg.num_layers, student_cfg.intermediate_size) == (1, 48)
  params = build.student_params(cfg, student_cfg, teacher,
                                build.param_shardings(student_cfg, MESH, RULES),
                                jax.random.key(1))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cli_init_from_starts_from_the_checkpoint(shared, reference, tmp_path):  # noqa: F811
  workdir = tmp_path / "run"
  code, out, err = finish(start(shared, workdir, "--init_from", str(reference)))
  assert code == 0, err[-3000:]
  assert f'"init_from": "{reference}"' in out
  first = read_metrics(str(workdir))[0]
  ref = [m for m in read_metrics(str(reference)) if "loss/total" in m]
  assert first["step"] == 1 and ref[-1]["step"] == 24
  # The first step starts from the trained student (step 24's loss), not the fresh one.
  assert abs(first["loss/total"] - ref[-1]["loss/total"]) < abs(
      first["loss/total"] - ref[0]["loss/total"])
  assert os.path.exists(workdir / "config.json")



def test_pruned_student_from_the_first_training_batches(tmp_path):
  """``student.source=prune``: the teacher's importance on the first training batch, pruned;
  the data is rewound, so training sees the same batches as any other student would."""
  from jkd import students  # noqa: PLC0415
  from jkd.data import ArraySource  # noqa: PLC0415
  from jkd.train import loop  # noqa: PLC0415
  cfg = tiny_config(student__source="prune", train__steps=1, eval__every=0,
                    checkpoint__every=0)
  cfg.student.prune.update(dict(num_layers=3, intermediate_size=40, calibration_batches=1))
  spec = build.teacher_spec(cfg)
  teacher = build.build_teacher(spec, MESH, RULES, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, teacher.config.vocab_size, (16, 16)).astype(np.int32)
  data = {"tokens": tokens, "labels": np.concatenate([tokens[:, 1:], np.full((16, 1), -100)],
                                                     1).astype(np.int32)}
  source = ArraySource(data, batch_size=8, seed=0)
  first = next(ArraySource(data, batch_size=8, seed=0))
  imp = students.measure(teacher.params, teacher.config, [first])
  want_cfg, want = students.prune(teacher.params, teacher.config, imp, num_layers=3,
                                  intermediate_size=40)
  student_cfg = build.student_config(cfg, teacher.config)
  assert student_cfg == want_cfg.replace(scan_unroll=3)
  params = build.student_params(cfg, student_cfg, teacher,
                                build.param_shardings(student_cfg, MESH, RULES),
                                jax.random.key(1), functools.partial(build.peek_batches, source))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
  np.testing.assert_array_equal(next(source)["tokens"], first["tokens"])  # Rewound.
  result = loop.train(cfg, str(tmp_path), train_source=ArraySource(data, batch_size=8, seed=0),
                      teacher=teacher)
  assert result["status"] == "done" and result["state"].params["layers"]["mlp"]["up"][
      "kernel"].shape == (3, teacher.config.hidden_size, 40)
  with pytest.raises(ValueError, match=r"student.prune: intermediate_size=999 must be an int"):
    build.student_config(_prune_cfg(intermediate_size=999), teacher.config)


def _prune_cfg(**sizes):
  cfg = tiny_config(student__source="prune")
  cfg.student.prune.update(sizes)
  return cfg
