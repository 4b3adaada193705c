"""On-policy distillation sources (jkd.train.sources.onpolicy): GKD's coin, the student's samples written
into the batch, DistiLLM's replay buffer and adaptive share, exact state round trips, and a GKD
run through jkd.train.train that resumes from a checkpoint to identical metrics."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from jkd import models
from jkd import sampling
from jkd import train
from jkd.data import ArraySource
from jkd.train import loop
from jkd.train.writer import read_metrics
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, B, T = 32, 4, 12
CONFIG = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_position_embeddings=64)
EOS = 3


@pytest.fixture(scope="module")
def params():
  return jax.jit(functools.partial(models.init_params, CONFIG))(jax.random.key(0))


def examples(seed=0):
  """Prompt (2..5 tokens) + completion rows, right-padded; loss on the completion only."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, CONFIG.vocab_size, (N, T + 1)).astype(np.int32)
  labels = tokens[:, 1:].copy()
  prompt = rng.integers(2, 6, N)
  end = rng.integers(8, T + 1, N)
  pos = np.arange(T)
  labels[(pos < prompt[:, None] - 1) | (pos >= end[:, None])] = -100
  tokens = np.where(pos <= end[:, None], tokens[:, :T], 0).astype(np.int32)
  return {"tokens": tokens, "labels": labels, "loss_mask": labels != -100,
          "attention_mask": pos <= end[:, None]}


def source(**options):
  base = ArraySource(examples(), batch_size=B, seed=1)
  return train.OnPolicySource(base, student_config=CONFIG, seed=7, eos_id=EOS,
                              max_new_tokens=10, **options)


def test_lmbda_zero_gives_the_base_batches(params):
  src = source(lmbda=0.0)
  base = ArraySource(examples(), batch_size=B, seed=1)
  for _ in range(3):
    src.before_batch(params)
    batch, want = next(src), next(base)
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key])
    assert (batch["metric/onpolicy/rows"] == 0).all()
    assert (batch["metric/onpolicy/fraction"] == 0).all()


def test_lmbda_one_writes_the_students_samples(params):
  src = source(lmbda=1.0, temperature=0.9)
  base = ArraySource(examples(), batch_size=B, seed=1)
  for index in range(2):
    src.before_batch(params)
    batch, original = next(src), next(base)
    prompts = []
    for row in range(B):  # The prompt: tokens up to the first loss position (by hand).
      first = np.flatnonzero(original["labels"][row] != -100)[0]
      prompts.append(original["tokens"][row, :first + 1].tolist())
    out = sampling.generate(params, prompts, config=CONFIG, key=src.sample_key(index),
                            max_new_tokens=10, temperature=0.9, eos_id=EOS, bucket=T)
    for row, prompt in enumerate(prompts):
      n, sample = len(prompt), np.asarray(out.tokens[row, :out.lengths[row]])
      want_tokens = np.zeros(T, np.int32)
      want_tokens[:n] = prompt
      want_tokens[n:n + len(sample)] = sample[:T - n]
      want_labels = np.full(T, -100)
      want_labels[n - 1:n - 1 + len(sample)] = sample[:T - n + 1]
      np.testing.assert_array_equal(batch["tokens"][row], want_tokens)
      np.testing.assert_array_equal(batch["labels"][row], want_labels)
      np.testing.assert_array_equal(batch["loss_mask"][row], want_labels != -100)
      np.testing.assert_array_equal(batch["attention_mask"][row],
                                    np.arange(T) < n + min(len(sample), T - n))
    assert (batch["metric/onpolicy/rows"] == 1).all()
    assert (batch["metric/onpolicy/fraction"] == 1).all()


def test_gkd_coin_follows_lmbda_and_the_fraction_counts_batches(params):
  src = source(lmbda=0.5)
  coins = [src.coin(i) for i in range(6)]
  served = []
  for i in range(6):
    src.before_batch(params)
    batch = next(src)
    served.append(batch["metric/onpolicy/rows"].max())
    np.testing.assert_allclose(batch["metric/onpolicy/fraction"][0], np.mean(served))
  assert served == [float(c < 0.5) for c in coins]


def distillm(**options):
  base = ArraySource(examples(), batch_size=B, seed=1)
  return train.AdaptiveOffPolicySource(base, student_config=CONFIG, seed=3, eos_id=EOS,
                                       max_new_tokens=6, lmbda=0.5, buffer_size=5, p_step=0.5,
                                       **options)


def test_distillm_p_grows_when_the_validation_loss_stalls():
  src = distillm()
  for value, p in ((2.0, 0.0), (1.5, 0.0), (1.5, 0.5), (1.7, 1.0), (1.0, 1.0), (2.0, 1.0)):
    src.after_eval({"eval/kl_forward": value}, None)
    assert src.p == p
  with pytest.raises(ValueError, match="onpolicy.metric 'eval/kl_forward' is not among"):
    src.after_eval({"eval/student_nll": 1.0}, None)


def test_distillm_state_round_trip_continues_exactly(params):
  src = distillm()
  src.after_eval({"eval/kl_forward": 1.0}, None)
  src.after_eval({"eval/kl_forward": 1.0}, None)  # No improvement: p = 0.5, 2 of the 4 rows.
  for _ in range(4):
    src.before_batch(params)
    batch = next(src)
    assert batch["metric/onpolicy/rows"].sum() == 2 and (batch["metric/onpolicy/p"] == 0.5).all()
  assert 2 <= len(src.buffer) <= 5
  state = json.loads(json.dumps(src.get_state()))
  resumed = distillm()
  resumed.set_state(state)
  replayed = 0
  for _ in range(5):
    src.before_batch(params)
    resumed.before_batch(params)
    a, b = next(src), next(resumed)
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    replayed += src.coin(src.get_state()["index"] - 1) >= 0.5
  assert replayed  # Some batches replayed buffered rows rather than sampling fresh ones.
  assert json.dumps(src.get_state()) == json.dumps(resumed.get_state())


def test_unsupported_batches_and_options_are_errors(params):
  base = ArraySource(dict(examples(), positions=np.zeros((N, T), np.int32)), batch_size=B)
  src = train.OnPolicySource(base, student_config=CONFIG, lmbda=1.0)
  with pytest.raises(ValueError, match=r"also has \['positions'\]"):
    next(src)
  with pytest.raises(ValueError, match="lmbda must be a number in"):
    source(lmbda=1.5)
  src = source(lmbda=1.0)
  with pytest.raises(ValueError, match="call before_batch"):
    next(src)


# ---------------------------------------------------------------------------------------------
# Through the engine.

class _Stop(Exception):
  pass


class _StopAfter:
  """A source that raises after ``n`` batches (an interrupted run)."""

  def __init__(self, source, n):
    self.source, self.n = source, n

  def __next__(self):
    if self.n == 0:
      raise _Stop("stop")
    self.n -= 1
    return next(self.source)

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state):
    self.source.set_state(state)


def _config():
  cfg = load_config("kd_tiny")
  cfg.train.update(dict(steps=4, progress_bar=False))
  cfg.eval.update(dict(every=2, batches=1))
  cfg.checkpoint.update(dict(every=2, async_save=False))
  train.add_sections(cfg, "onpolicy")  # kd_tiny has no on-policy section
  cfg.onpolicy.update(dict(mode="gkd", lmbda=0.5, max_new_tokens=8, eos_id=EOS))
  return cfg


def _run(cfg, workdir, stop_after=None):
  train_src, eval_src = train.make_sources(cfg, cfg.teacher.model.vocab_size)
  if stop_after is not None:
    train_src = _StopAfter(train_src, stop_after)
  return loop.train(cfg, str(workdir), train_source=train_src, eval_source=eval_src)


def test_gkd_run_resumes_to_identical_metrics(tmp_path, monkeypatch):
  reports = []
  monkeypatch.setattr(train.OnPolicySource, "after_eval",
                      lambda self, metrics, params: reports.append(dict(metrics)))
  cfg = _config()
  _run(cfg, tmp_path / "full")
  assert len(reports) == 2 and all("eval/kl_forward" in r for r in reports)  # Steps 2 and 4.
  with pytest.raises(_Stop):
    _run(cfg, tmp_path / "resumed", stop_after=2)
  assert [n for n in os.listdir(tmp_path / "resumed" / "checkpoints") if n.isdigit()] == ["2"]
  _run(cfg, tmp_path / "resumed")

  def exact(workdir):
    return [{k: v for k, v in m.items() if not k.startswith("perf/")}
            for m in read_metrics(str(workdir))]

  full = exact(tmp_path / "full")
  assert exact(tmp_path / "resumed") == full
  rows = [m["onpolicy/rows"] for m in full if "onpolicy/rows" in m]
  assert len(rows) == 4 and 0.0 in rows and 1.0 in rows  # Both kinds of batch in the 4 steps.
  assert [m["onpolicy/fraction"] for m in full if "onpolicy/fraction" in m][-1] == np.mean(rows)
