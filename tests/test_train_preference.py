"""Preference batches in the one train step (jkd.train.preference_step): DPO family, SimPO, ORPO,
KTO, the teacher as reference, a precomputed reference, fused log-probs, and the engine end to end.

References: float64 NumPy log-softmax of the models' own logits (each sequence run alone), and
the float64 loss formulas of tests/reference_preference.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference_preference as rp
from jkd import losses
from jkd import train
from jkd.data import ArraySource
from jkd.train import loop
from jkd.train.writer import read_metrics
from tiny_models import TinyModel

B, T = 4, 12
TINY = TinyModel()
CONFIG, _init, _logits = TINY.config, TINY.init, TINY.logits


@pytest.fixture(scope="module")
def student():
  return _init(jax.random.key(0))


@pytest.fixture(scope="module")
def teacher():
  return _init(jax.random.key(1))


def _rows(rng, prompt_lens, completion_lens):
  """Right-padded rows: prompt + completion; labels = next tokens on the completion only."""
  tokens = np.zeros((len(prompt_lens), T), np.int32)
  labels = np.full((len(prompt_lens), T), -100, np.int32)
  for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
    seq = rng.integers(1, CONFIG.vocab_size, p + c)
    tokens[i, :min(p + c, T)] = seq[:T]
    labels[i, p - 1:p - 1 + c] = seq[p:p + c]
  return tokens, labels


def pair_batch(rng):
  prompts = rng.integers(2, 5, B)
  chosen = _rows(rng, prompts, rng.integers(3, T - 5, B))
  # Same prompts for the rejected completion.
  rejected_tokens, rejected_labels = _rows(rng, prompts, rng.integers(2, T - 5, B))
  rejected_tokens[:, :4] = np.where(np.arange(4) < prompts[:, None], chosen[0][:, :4],
                                    rejected_tokens[:, :4])
  return {"chosen_tokens": chosen[0], "chosen_labels": chosen[1],
          "rejected_tokens": rejected_tokens, "rejected_labels": rejected_labels}


def np_logps(params, tokens, labels):
  """``(sum, mean, count)`` per row: each row run alone, float64 log-softmax of its logits."""
  logits = np.stack([np.asarray(_logits(params, jnp.asarray(row[None]))[0]) for row in tokens])
  return rp.sequence_logprobs(logits, labels)


def make_step(spec, *, lr=0.0):
  objective = losses.build_objective(spec)
  optimizer = optax.sgd(lr)
  step = train.make_train_step(student_config=CONFIG, teacher_config=CONFIG, objective=objective,
                               optimizer=optimizer, schedule=lambda s: lr)
  return objective, optimizer, jax.jit(step)


def run_step(spec, params, batch, teacher_params):
  objective, optimizer, step = make_step(spec)
  state = train.init_state(params, optimizer, objective)
  _, metrics = step(state, jax.tree.map(jnp.asarray, batch), jax.random.key(0), teacher_params)
  return {k: float(v) for k, v in metrics.items()}


def run_forward(spec, params, batch, teacher_params):
  """The step's forward half only (model_inputs -> objective; compiles in a fraction of the
  step's time): metrics and ``train/tokens``."""
  objective = losses.build_objective(spec)

  def forward(p, b, t):
    inputs, _ = train.model_inputs(p, t, b, student_config=CONFIG, teacher_config=CONFIG,
                                   objective=objective)
    metrics = objective(inputs)[1]
    metrics["train/tokens"] = train.completion_tokens(b, inputs)
    return metrics

  metrics = jax.jit(forward)(params, jax.tree.map(jnp.asarray, batch), teacher_params)
  return {k: float(v) for k, v in metrics.items()}


def _np_pairs(student, teacher, batch):
  pc = np_logps(student, batch["chosen_tokens"], batch["chosen_labels"])
  pr = np_logps(student, batch["rejected_tokens"], batch["rejected_labels"])
  rc = np_logps(teacher, batch["chosen_tokens"], batch["chosen_labels"])
  rr = np_logps(teacher, batch["rejected_tokens"], batch["rejected_labels"])
  return pc, pr, rc, rr


# Terms with their float64 references from (policy chosen, rejected, ref chosen, rejected), each
# a (sum, mean, count) triple. One objective holds them all: each is checked through its metric.
TERMS = {
    "dpo": ({"beta": 0.1},
            lambda pc, pr, rc, rr: rp.trl_loss("sigmoid", pc[0], pr[0], rc[0], rr[0], beta=0.1)),
    "ipo_hinge": ({"term": "dpo", "beta": 0.2, "loss_type": ["ipo", "hinge"],
                   "loss_weights": [1.0, 0.5]},
                  lambda pc, pr, rc, rr: rp.trl_loss("ipo", pc[1], pr[1], rc[1], rr[1], beta=0.2)
                  + 0.5 * rp.trl_loss("hinge", pc[0], pr[0], rc[0], rr[0], beta=0.2)),
    "simpo": ({"weight": 0.5}, lambda pc, pr, rc, rr: rp.simpo_loss(pc[1], pr[1])),
    "orpo": ({"lam": 0.1}, lambda pc, pr, rc, rr: rp.orpo_loss(pc[1], pr[1], lam=0.1)),
}


@pytest.mark.parametrize("fused", [False, True])
def test_pair_step_loss_equals_numpy_reference(fused, student, teacher, rng):
  names = sorted(TERMS) if not fused else ["dpo"]
  spec = {n: dict(TERMS[n][0], fused=True) if fused else TERMS[n][0] for n in names}
  batch = pair_batch(rng)
  metrics = (run_forward if fused else run_step)(spec, student, batch, teacher)
  pc, pr, rc, rr = _np_pairs(student, teacher, batch)
  total = 0.0
  for name in names:
    expected = float(np.mean(TERMS[name][1](pc, pr, rc, rr)))
    np.testing.assert_allclose(metrics[f"loss/{name}"], expected, rtol=2e-5, atol=1e-6,
                               err_msg=name)
    total += TERMS[name][0].get("weight", 1.0) * expected
  np.testing.assert_allclose(metrics["loss/total"], total, rtol=2e-5, atol=1e-6)
  assert metrics["train/tokens"] == (batch["chosen_labels"] != -100).sum() + (
      batch["rejected_labels"] != -100).sum()
  # The term's metrics come through, namespaced; equal to the formula.
  want = rp.preference_metrics(pc[0], pr[0], rc[0], rr[0], beta=0.1)
  for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
    np.testing.assert_allclose(metrics[f"dpo/{key}"], want[key], rtol=2e-5, atol=1e-6)
  # jkd.losses.preference_loss on the NumPy log-probs gives the same value.
  jkd_value = jnp.mean(losses.preference_loss(*(jnp.asarray(x[0], jnp.float32)
                                                for x in (pc, pr, rc, rr)), beta=0.1))
  np.testing.assert_allclose(metrics["loss/dpo"], float(jkd_value), rtol=2e-5)


def test_reference_from_the_batch_equals_the_teacher(student, teacher, rng):
  batch = pair_batch(rng)
  with_teacher = run_forward({"dpo": {"beta": 0.1}}, student, batch, teacher)
  rc = np_logps(teacher, batch["chosen_tokens"], batch["chosen_labels"])[0]
  rr = np_logps(teacher, batch["rejected_tokens"], batch["rejected_labels"])[0]
  given = dict(batch, reference_chosen_logps=rc.astype(np.float32),
               reference_rejected_logps=rr.astype(np.float32))
  without_teacher = run_forward({"dpo": {"beta": 0.1}}, student, given, None)
  for key in ("loss/total", "dpo/rewards/margins", "dpo/rewards/chosen"):
    np.testing.assert_allclose(without_teacher[key], with_teacher[key], rtol=1e-5, atol=1e-6)
  # The teacher runs only when a term needs it.
  keys = given.keys()
  assert not train.preference_step.runs_teacher(losses.build_objective({"dpo": {}}), keys)
  assert train.preference_step.runs_teacher(losses.build_objective({"dpo": {}}), batch.keys())
  assert not train.preference_step.runs_teacher(losses.build_objective({"simpo": {}}),
                                                batch.keys())


def test_kto_step_equals_numpy_reference_with_mismatched_pairs(student, teacher, rng):
  tokens, labels = _rows(rng, rng.integers(2, 5, B), rng.integers(2, T - 5, B))
  desirable = np.array([True, False, True, False])
  metrics = run_forward({"kto": {"beta": 0.1}}, student,
                     {"tokens": tokens, "labels": labels, "desirable": desirable}, teacher)
  # Mismatched pairs written out by hand: prompt of row i, completion of row i + 1.
  kl_tokens = np.zeros_like(tokens)
  kl_labels = np.full_like(labels, -100)
  for i in range(B):
    j = (i + 1) % B
    s_i = np.flatnonzero(labels[i] != -100)[0]
    completion = labels[j][labels[j] != -100]
    row = np.concatenate([tokens[i, :s_i + 1], completion])[:T + 1]
    kl_tokens[i, :min(len(row), T)] = row[:T]
    kl_labels[i, s_i:s_i + len(completion)] = completion[:T - s_i]
  pol, ref = np_logps(student, tokens, labels)[0], np_logps(teacher, tokens, labels)[0]
  z = rp.kto_kl_estimate(np_logps(student, kl_tokens, kl_labels)[0],
                         np_logps(teacher, kl_tokens, kl_labels)[0])
  expected = np.mean(rp.kto_loss(pol, ref, desirable, kl=z, beta=0.1))
  np.testing.assert_allclose(metrics["loss/total"], expected, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["kto/kl"], z, rtol=1e-4, atol=1e-6)
  assert metrics["train/tokens"] == (labels != -100).sum()
  got = train.mismatched_pairs(tokens, labels)
  np.testing.assert_array_equal(got[1], kl_labels)
  np.testing.assert_array_equal(np.where(kl_labels != -100, got[0], 0)[:, 1:],
                                np.where(kl_labels != -100, kl_tokens, 0)[:, 1:])


def test_flops_and_tokens_count_both_sequences():
  objective = losses.build_objective({"dpo": {}})
  lm = train.batch_work({"tokens": (B, T)}, CONFIG, CONFIG, objective)
  pairs = {"chosen_tokens": (B, T), "rejected_tokens": (B, T)}
  assert train.batch_work(pairs, CONFIG, CONFIG, objective) == (2 * lm[0], 2 * lm[1])
  # A precomputed reference: no teacher forward.
  given = dict(pairs, reference_chosen_logps=(B,), reference_rejected_logps=(B,))
  tokens, flops = train.batch_work(given, CONFIG, CONFIG, objective, processes=2)
  assert tokens == 4 * B * T
  np.testing.assert_allclose(flops, 3 * train.flops_per_token(CONFIG, T) * tokens)


def test_bad_preference_batches_are_clear_errors(student, teacher, rng):
  batch = pair_batch(rng)
  with pytest.raises(ValueError, match="missing \\['rejected_labels'\\]"):
    run_step({"dpo": {}}, student, {k: v for k, v in batch.items() if k != "rejected_labels"},
             teacher)
  with pytest.raises(ValueError, match="pad both to one"):
    run_step({"dpo": {}}, student, dict(batch, rejected_tokens=batch["rejected_tokens"][:, :-1],
                                        rejected_labels=batch["rejected_labels"][:, :-1]),
             teacher)
  with pytest.raises(ValueError, match="give both precomputed reference fields"):
    run_step({"dpo": {}}, student, dict(batch, reference_chosen_logps=np.zeros(B, np.float32)),
             teacher)


def test_dpo_through_the_engine(tmp_path, rng):
  """train() on a fixed set of pairs: the teacher (= the student's initial copy) is the
  reference, the batches are sharded without a ``tokens`` key, and 3 steps of DPO raise the
  chosen-rejected margin (step k logs the metrics before its update)."""
  cfg = train.default_config()
  cfg.teacher.source = "random"
  cfg.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64))
  cfg.student.source, cfg.student.every = "layers", 1
  cfg.objective = {"dpo": {"beta": 0.1}, "nll": {"term": "cross_entropy", "weight": 0.1}}
  cfg.optimizer.update(dict(lr=1e-2, warmup_steps=0, weight_decay=0.0))
  cfg.train.update(dict(steps=4, log_every=1, progress_bar=False, peak_tflops_per_device=1.0))
  cfg.eval.every, cfg.checkpoint.every, cfg.checkpoint.async_save = 0, 0, False
  source = ArraySource(pair_batch(rng), batch_size=B, seed=0)  # The same B pairs.
  out = loop.train(cfg, str(tmp_path), train_source=source)
  assert out["status"] == "done" and out["step"] == 4
  lines = [m for m in read_metrics(str(tmp_path)) if "loss/total" in m]
  assert [m["step"] for m in lines] == [1, 2, 3, 4]
  margins = [m["dpo/rewards/margins"] for m in lines]
  assert abs(margins[0]) < 1e-6  # Policy == reference (an every=1 student).
  assert margins[1] < margins[2] < margins[3] and margins[3] > 0, margins
  assert all(np.isfinite(m["loss/nll"]) and m["train/tokens"] > 0 for m in lines)
