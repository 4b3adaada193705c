"""DCKD and ADPA terms in the train step, Distillation-DPO rounds, and their configs end to end.

References: float64 NumPy log-softmax of each model's logits (each row run alone), top-k and
tail mass written from the definitions, and the DCKD/ADPA formulas of docs/methods.md §10.1-§10.2.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd import losses
from jkd import train
from jkd.data.model_spec import char_tokenizer
from jkd.train import loop
from jkd.train import preference_step
from jkd.data import synthetic_pair_examples
from jkd.train.sources import rounds
from jkd.train.writer import read_metrics
from tiny_models import TinyModel
from recipe_configs import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, K = 3, 12, 5
TINY = TinyModel(max_position_embeddings=256)
CONFIG, _init, _logits = TINY.config, TINY.init, TINY.logits
np_logsoftmax = TINY.np_logsoftmax


@pytest.fixture(scope="module")
def nets():
  return {name: _init(jax.random.key(i)) for i, name in enumerate(("student", "teacher", "ref"))}


def np_topk(logp, k):
  ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
  top = np.take_along_axis(logp, ids, -1)
  tail = np.log(np.maximum(1 - np.exp(top).sum(-1), np.exp(-30.0)))
  return ids, top, tail


def step_metrics(spec, params, batch, teacher):
  objective = losses.build_objective(spec)
  step = train.make_train_step(student_config=CONFIG, teacher_config=CONFIG, objective=objective,
                               optimizer=optax.sgd(0.0), schedule=lambda s: 0.0)
  state = train.init_state(params, optax.sgd(0.0), objective)
  _, metrics = jax.jit(step)(state, {k: jnp.asarray(v) for k, v in batch.items()},
                             jax.random.key(0), teacher)
  return {k: float(v) for k, v in metrics.items()}


def pairs(n=B, seed=0):
  return synthetic_pair_examples(n, T, CONFIG.vocab_size, seed=seed)


def test_dckd_term_is_dckd_loss_on_the_teachers_topk(nets):
  batch = pairs()
  got = step_metrics({"dckd": {"k": K, "kd_weight": 0.3}}, nets["student"], batch,
                     nets["teacher"])
  sides = {}
  for side in ("chosen", "rejected"):
    tokens, labels = batch[f"{side}_tokens"], batch[f"{side}_labels"]
    ids, top, tail = np_topk(np_logsoftmax(nets["teacher"], tokens), K)
    sides[side] = (jnp.asarray(np.asarray(_logits(nets["student"], jnp.asarray(tokens)))),
                   jnp.asarray(labels), losses.SparseTeacher(jnp.asarray(ids),
                                                             jnp.asarray(top, jnp.float32),
                                                             jnp.asarray(tail, jnp.float32)))
  want = losses.dckd_loss(*sides["chosen"], *sides["rejected"], kd_weight=0.3)
  np.testing.assert_allclose(got["loss/dckd"], float(jnp.mean(want)), rtol=2e-5)
  # NLL alone (independent): mean over pairs of the chosen completions' token-mean NLL.
  logp = np_logsoftmax(nets["student"], batch["chosen_tokens"])
  lab = batch["chosen_labels"]
  m = lab != -100
  tok = np.take_along_axis(logp, np.where(m, lab, 0)[..., None], -1)[..., 0]
  nll = -(np.where(m, tok, 0).sum(1) / m.sum(1)).mean()
  np.testing.assert_allclose(got["dckd/nll"], nll, rtol=2e-5)


def test_pair_teacher_targets_and_the_adpa_term_follow_the_formulas(nets):
  batch = pairs(seed=1)
  targets = preference_step.pair_teacher_targets(
      batch, teacher=(nets["teacher"], CONFIG), reference=(nets["ref"], CONFIG), k=K,
      batch_size=2)
  want_loss, count, adv = 0.0, 0, 0.0
  for side in ("chosen", "rejected"):
    tokens, labels = batch[f"{side}_tokens"], batch[f"{side}_labels"]
    ids, top, tail = np_topk(np_logsoftmax(nets["teacher"], tokens), K)
    ref = np.take_along_axis(np_logsoftmax(nets["ref"], tokens), ids, -1)
    np.testing.assert_array_equal(targets[f"{side}_teacher_topk_ids"], ids)
    np.testing.assert_allclose(targets[f"{side}_teacher_topk_logprobs"], top, atol=2e-5)
    np.testing.assert_allclose(targets[f"{side}_teacher_tail_logprob"], tail, atol=2e-4)
    np.testing.assert_allclose(targets[f"{side}_teacher_ref_logprobs"], ref, atol=2e-5)
    q = np.take_along_axis(np.exp(np_logsoftmax(nets["student"], tokens)), ids, -1)
    per_token = -(q * (top - ref)).sum(-1)
    m = labels != -100
    adv += per_token[m].sum()
    count += m.sum()
  logp = np_logsoftmax(nets["student"], batch["chosen_tokens"])
  lab = batch["chosen_labels"]
  m = lab != -100
  tok = np.take_along_axis(logp, np.where(m, lab, 0)[..., None], -1)[..., 0]
  nll = -(np.where(m, tok, 0).sum(1) / m.sum(1)).mean()
  want_loss = nll + 1.6 * adv / count
  # The teacher does not run: the targets come with the batch (teacher_params=None works).
  got = step_metrics({"adpa": {"k": K}}, nets["student"], {**batch, **targets}, None)
  np.testing.assert_allclose(got["loss/adpa"], want_loss, rtol=2e-5)
  np.testing.assert_allclose(got["adpa/advantage"], adv / count, rtol=2e-4, atol=1e-6)
  assert not preference_step.runs_teacher(losses.build_objective({"adpa": {"k": K}}),
                                          {**batch, **targets})


def test_dpo_gets_no_sparse_inputs_and_bad_setups_are_errors(nets):
  batch = {k: jnp.asarray(v) for k, v in pairs().items()}
  inputs, _ = preference_step.preference_inputs(
      nets["student"], nets["teacher"], batch, student_config=CONFIG, teacher_config=CONFIG,
      objective=losses.build_objective({"dpo": 1.0}))
  assert "chosen_teacher_topk" not in inputs and "chosen_student_logits" not in inputs
  with pytest.raises(ValueError, match="chosen_teacher_ref_logprobs"):
    step_metrics({"adpa": {"k": K}}, nets["student"], pairs(), nets["teacher"])
  with pytest.raises(ValueError, match="different teacher top-k sizes"):
    preference_step.topk_size(losses.build_objective(
        {"dckd": {"k": 3}, "a": {"term": "adpa", "k": 4}}))
  with pytest.raises(ValueError, match="k .* must be an int >= 1"):
    losses.build_objective({"dckd": {"k": 0}})
  with pytest.raises(ValueError, match="on must be one of"):
    losses.build_objective({"adpa": {"on": "both_sides"}})


# ---------------------------------------------------------------------------------------------
# Distillation-DPO rounds.

def round_source(**options):
  kw = dict(tokenizer=char_tokenizer(128), seq_len=96, batch_size=4, steps_per_round=2, n=2,
            max_new_tokens=5, seed=3, process_index=0, process_count=1)
  kw.update(options)
  src = rounds.RoundPairsSource(["Hi there", "Name a color.", "Count to three."], **kw)
  return src


def test_rounds_remake_pairs_each_round_and_resume_exactly(nets):
  src = round_source()
  src.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)
  src.before_batch(nets["student"])
  first = next(src)
  assert first["chosen_tokens"].shape == (4, 96)
  made = src._pairs
  # The pairs are make_pairs' with the teacher scorer and round_index 0.
  from jkd.data import preference  # noqa: PLC0415
  want = preference.make_pairs(src.prompts, policy=(nets["student"], CONFIG),
                               tokenizer=src.tokenizer, scorer="teacher_logprob",
                               scorer_options={"params": nets["teacher"], "config": CONFIG,
                                               "batch_size": 8},
                               n=2, max_new_tokens=5, seed=3, round_index=0, batch_size=8)
  assert made == [dict(p) for p in want]
  mid = json.loads(json.dumps(src.get_state()))
  assert mid["pairs"] == made
  second = next(src)
  restored = round_source()  # No models: a mid-round state needs no sampling.
  restored.set_state(mid)
  again = next(restored)
  for k in second:
    np.testing.assert_array_equal(again[k], second[k])
  # Round 1: fresh samples (round_index 1), made at the boundary from the given student.
  boundary = src.get_state()
  assert boundary["pairs"] is None and boundary["step"] == 2
  third = next(src)
  assert src._round == 1 and third["metric/rounds/round"][0] == 1
  lazy = round_source()
  lazy.set_state(boundary)
  lazy.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)
  lazy.before_batch(nets["student"])
  again = next(lazy)
  for k in third:
    np.testing.assert_array_equal(again[k], third[k])
  with pytest.raises(ValueError, match="steps_per_round"):
    round_source(steps_per_round=3).set_state(boundary)
  with pytest.raises(ValueError, match="bind_models"):
    next(round_source())


# ---------------------------------------------------------------------------------------------
# The configs' cpu variants end to end.

def load_config(name, arg="cpu"):
  module = load_module(name)
  return module, module.get_config(arg)


@pytest.mark.parametrize("name", ["adpa", "distill_dpo"])  # dckd:cpu runs in test_configs.py
def test_cpu_variant_trains(name, tmp_path):
  module, cfg = load_config(name)
  overrides = module.make_cpu_data(str(tmp_path / "data"))
  with cfg.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      cfg[section][field] = value
    cfg.train.progress_bar = False
    cfg.checkpoint.async_save = False
    cfg.train.steps = steps = 4 if name == "distill_dpo" else 2
  workdir = str(tmp_path / "run")
  result = loop.train(cfg, workdir)
  assert result["status"] == "done" and result["step"] == steps
  metrics = read_metrics(workdir)
  term = next(iter(cfg.objective.keys()))
  values = [m[f"loss/{term}"] for m in metrics if f"loss/{term}" in m]
  assert len(values) == steps and np.isfinite(values).all()
  if name == "distill_dpo":
    assert [m["rounds/round"] for m in metrics if "rounds/round" in m] == [0, 0, 1, 1]
