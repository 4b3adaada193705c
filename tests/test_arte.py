"""ARTE (docs/methods.md §19): the student's learning signal, the draft pairs, and the recipe.

References: a float64 NumPy bigram model (tests/reference_arte.py: closed-form loss, gradient
and look-ahead gain) for :func:`jkd.data.arte.lookahead_gains`; an unvmapped JAX recomputation
(a loop over drafts, its own loss) and the float64 log-softmax of tests/tiny_models.py for the
transformer signal :func:`jkd.data.arte.student_gains`. The recipe's CPU variant
(configs/arte.py) runs end to end tuned and untuned: the student distilled on the tuned
teacher's corpus must reach a lower held-out target NLL.
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_arte as ref
from jkd import models
from jkd.data import arte
from jkd.train import arte_cpu, build, recipes, sharding, stages
from jkd.train.sources import arte as arte_source
from jkd.train.writer import read_metrics
from recipe_configs import load_module
from tiny_models import TinyModel

V = 11


def bigram_loss(w, batch):
  """The bigram model's mean NLL in JAX (the model under lookahead_gains)."""
  mask = (batch["labels"] != -100) & batch["loss_mask"]
  logp = jax.nn.log_softmax(w[batch["tokens"]], axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(mask, batch["labels"], 0)[..., None], -1)[..., 0]
  return -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def lm_batch(rng, n, t, vocab, *, lengths=None):
  tokens = rng.integers(0, vocab, (n, t))
  labels = np.concatenate([tokens[:, 1:], np.full((n, 1), -100)], 1)
  mask = np.ones((n, t), bool)
  mask[:, -1] = False
  if lengths is not None:
    for i, length in enumerate(lengths):
      mask[i, length:] = False
      labels[i, length:] = -100
  return {"tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32),
          "loss_mask": mask}


# ---------------------------------------------------------------------------------------------
# The signal against the float64 reference.

def test_reference_gradient_matches_finite_differences(rng):
  w = rng.normal(size=(V, V))
  batch = lm_batch(rng, 2, 5, V, lengths=[5, 3])
  grad = ref.bigram_grad(w, batch)
  eps = 1e-6
  for a, b in [(batch["tokens"][0, 0], 3), (batch["tokens"][1, 1], 0), (0, 0)]:
    bump = np.zeros_like(w)
    bump[a, b] = eps
    fd = (ref.bigram_nll(w + bump, batch) - ref.bigram_nll(w - bump, batch)) / (2 * eps)
    np.testing.assert_allclose(grad[a, b], fd, atol=1e-8)


@pytest.mark.parametrize("steps", [1, 3])
def test_lookahead_gains_match_the_float64_reference(rng, x64, steps):
  w = rng.normal(size=(V, V))
  drafts = lm_batch(rng, 5, 6, V, lengths=[6, 4, 2, 5, 6])
  validation = lm_batch(rng, 3, 6, V)
  fn = jax.jit(lambda w, d, v, lr: arte.lookahead_gains(bigram_loss, w, d, v, lr=lr,
                                                          steps=steps))
  got = np.asarray(fn(jnp.asarray(w), drafts, validation, 2.0))
  assert got.dtype == np.float64
  want = [ref.lookahead_gain(w, {k: v[i:i + 1] for k, v in drafts.items()}, validation,
                             lr=2.0, steps=steps) for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
  assert np.ptp(want) > 1e-2  # The drafts differ: a ranking to get right.
  # Float32 (what the engine computes) agrees to float32 precision.
  got32 = np.asarray(fn(jnp.asarray(w, jnp.float32), drafts, validation, np.float32(2.0)))
  assert got32.dtype == np.float32
  np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)
  if steps == 1:  # A small step's gain is lr <grad L(V), grad l(d)> (first order).
    lr = 1e-6
    g_val = ref.bigram_grad(w, validation)
    first_order = [lr * np.sum(g_val * ref.bigram_grad(w, {k: v[i:i + 1]
                                                           for k, v in drafts.items()}))
                   for i in range(5)]
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray(w), drafts, validation, lr)),
                               first_order, rtol=1e-4, atol=1e-14)


TINY = TinyModel()
ONE_LAYER = TINY.config.replace(num_layers=1)


@jax.jit
def own_loss(params, tokens, labels, mask):
  logits = models.apply(params, tokens, config=ONE_LAYER).logits
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  lp = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], -1)[..., 0]
  return -jnp.sum(lp * mask) / jnp.sum(mask)


def test_student_gains_match_an_unvmapped_recomputation(rng):
  params = models.init_params(ONE_LAYER, jax.random.key(3))
  drafts = lm_batch(rng, 5, 8, 128, lengths=[8, 5, 3, 8, 6])
  validation = lm_batch(rng, 3, 8, 128)
  got = arte.student_gains(params, ONE_LAYER, drafts, validation, lr=0.3,
                           batch_size=2)  # Chunks of 2, the last one padded.
  grad = jax.jit(jax.grad(own_loss))
  val = (validation["tokens"], validation["labels"], validation["loss_mask"])
  base = own_loss(params, *val)
  want = []
  for i in range(5):  # One draft at a time: its gradient, one SGD step, the validation loss.
    g = grad(params, *(drafts[k][i:i + 1] for k in ("tokens", "labels", "loss_mask")))
    stepped = jax.tree.map(lambda a, b: a - 0.3 * b, params, g)
    want.append(float(base - own_loss(stepped, *val)))
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)
  assert np.ptp(want) > 1e-3


def test_mean_nll_matches_the_float64_log_softmax(rng):
  params = TINY.init(jax.random.key(4))
  batch = lm_batch(rng, 3, 8, 128, lengths=[8, 2, 5])
  lp = TINY.np_token_logprobs(params, batch["tokens"], np.where(batch["loss_mask"],
                                                               batch["labels"], 0))
  want = -(lp * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  got = jax.jit(lambda p, b: arte.mean_nll(p, b, config=TINY.config))(params, batch)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_student_gains_errors_name_the_problem(rng):
  params = None  # Every check runs before the model does.
  drafts, validation = lm_batch(rng, 2, 6, 128), lm_batch(rng, 2, 6, 128)
  empty = {k: v[:0] for k, v in validation.items()}
  with pytest.raises(ValueError, match="validation examples are empty"):
    arte.student_gains(params, TINY.config, drafts, empty, lr=0.1)
  silent = dict(validation, loss_mask=np.zeros_like(validation["loss_mask"]))
  with pytest.raises(ValueError, match="validation examples have no counted token"):
    arte.student_gains(params, TINY.config, drafts, silent, lr=0.1)
  bad = dict(drafts, loss_mask=drafts["loss_mask"].copy())
  bad["loss_mask"][1] = False
  with pytest.raises(ValueError, match=r"draft\(s\) \[1\] have no counted token"):
    arte.student_gains(params, TINY.config, bad, validation, lr=0.1)
  with pytest.raises(ValueError, match="outside the student's vocabulary"):
    arte.student_gains(params, TINY.config, dict(drafts, tokens=drafts["tokens"] + 200),
                       validation, lr=0.1)
  with pytest.raises(ValueError, match="lr must be a positive"):
    arte.student_gains(params, TINY.config, drafts, validation, lr=0.0)
  with pytest.raises(ValueError, match="steps must be an int >= 1"):
    arte.student_gains(params, TINY.config, drafts, validation, lr=0.1, steps=0)


# ---------------------------------------------------------------------------------------------
# Pairs.

def test_rank_drafts_pairs_the_best_and_worst_of_each_prompt():
  groups = ["b", "a", "b", "a", "c", "c", "b"]
  scores = [0.5, -1.0, 2.0, 3.0, 1.0, 1.0, -0.25]
  p = arte.rank_drafts(groups, scores)
  assert p.groups == ["b", "a"] and p.skipped == ["c"]  # c: a tie, no preference.
  assert p.chosen.tolist() == [2, 3] and p.rejected.tolist() == [6, 1]
  gap = arte.rank_drafts(groups, scores, min_gap=3.0)
  assert gap.groups == ["a"] and gap.skipped == ["b", "c"]  # b's gap 2.25 <= 3.


@pytest.mark.parametrize("groups,scores,kw,match", [
    (["a", "a", "b"], [1.0, 2.0, 3.0], {}, r"prompt\(s\) \['b'\] have a single draft"),
    (["a", "a"], [1.0, float("nan")], {}, "not finite, so the drafts have no ranking"),
    (["a", "a"], [1.0, float("inf")], {}, "not finite"),
    (["a", "a"], [1.0, 2.0, 3.0], {}, "one \\[N\\] entry per draft"),
    ([], [], {}, "no drafts to rank"),
    (["a", "a"], [1.0, 2.0], {"min_gap": -1.0}, "min_gap must be >= 0"),
])
def test_rank_drafts_errors(groups, scores, kw, match):
  with pytest.raises(ValueError, match=match):
    arte.rank_drafts(groups, scores, **kw)


# ---------------------------------------------------------------------------------------------
# The source's checks.

def test_options_and_target_errors(tmp_path):
  cfg = load_module("arte").get_config("cpu")
  cfg.arte.n = 1
  with pytest.raises(ValueError, match=r"arte.n must be an int >= 2 \(drafts per prompt"):
    arte_source.check_options(cfg)
  cfg.arte.n, cfg.arte.dpo_lr = 4, 0.0
  with pytest.raises(ValueError, match="arte.dpo_lr must be a positive"):
    arte_source.check_options(cfg)
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="holds no target example"):
    arte_source.read_target(str(empty))
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
  with pytest.raises(ValueError, match="not 'preference'"):
    arte_source.read_target(str(pairs))
  cfg.arte.dpo_lr = 1e-3
  with pytest.raises(ValueError, match="validation set is empty: no prompt is held out"):
    arte_source._targets(cfg, cfg.arte, None, [], 128)


# ---------------------------------------------------------------------------------------------
# The recipe's CPU variant, tuned and untuned.

def _summary(workdir):
  with open(os.path.join(workdir, "arte", "summary.json")) as f:
    return json.load(f)


def _target_share(workdir):
  records = arte_source._read_corpus(os.path.join(workdir, "data", "arte_train", "1.0.0"))
  return np.mean([np.mean([ch in arte_cpu.TARGET for ch in r["completion"]]) > 0.5
                  for r in records])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("arte")
  module = load_module("arte")
  overrides = module.make_cpu_data(str(root / "data"))
  out = {}
  for tune in (True, False):
    cfg = module.get_config("cpu")
    recipes.apply_overrides(cfg, overrides)
    cfg.arte.tune = tune
    cfg.lock()
    workdir = str(root / f"tune_{tune}")
    out[tune] = (cfg, workdir, stages.run(cfg, workdir))
  return out


def test_cpu_variant_tailored_corpus_beats_the_untuned_teachers(runs):
  nll, start = {}, {}
  for tune, (cfg, workdir, result) in runs.items():
    steps = int(cfg.train.steps)
    assert steps <= 8 and result["status"] == "done" and result["step"] == steps
    lines = [m for m in read_metrics(workdir) if "loss/total" in m]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert all(math.isfinite(m["loss/ce"]) for m in lines)
    nll[tune] = result["eval"]["eval/student_nll"]
    start[tune] = [m["eval/student_nll"] for m in read_metrics(workdir) if m["step"] == 0
                   and "eval/student_nll" in m]
  assert start[True] == start[False] and len(start[True]) == 1  # One initial student.
  tuned, untuned = _summary(runs[True][1]), _summary(runs[False][1])
  # The stages: pairs whose chosen drafts teach more, DPO that learned them, a corpus that
  # is more often the target chain and more useful to the student.
  assert tuned["pairs"] >= 8 and tuned["chosen_gain_mean"] > tuned["rejected_gain_mean"] + 0.1
  assert tuned["dpo_reward_accuracy"] >= 0.75 and tuned["dpo_reward_margin"] > 0
  assert "pairs" not in untuned and untuned["corpus_examples"] == tuned["corpus_examples"]
  assert _target_share(runs[True][1]) > _target_share(runs[False][1]) + 0.2
  assert tuned["corpus_gain_mean"] > untuned["corpus_gain_mean"] + 0.05
  # The claim: same student init and steps, lower held-out target NLL (measured: 3.23 vs 3.33).
  assert nll[True] < nll[False] - 0.05, nll


def test_a_rerun_reuses_the_stages_and_refuses_another_teachers_corpus(runs):
  cfg, workdir, _ = runs[True]

  def stamps():  # The stages' files (not the summary's timing, nor the DPO run's logs).
    out = {}
    for sub in ("arte", "data"):
      for base, _, names in os.walk(os.path.join(workdir, sub)):
        if "/dpo-" in base and "checkpoints" not in base:
          continue
        out.update({os.path.join(base, n): os.stat(os.path.join(base, n)).st_mtime_ns
                    for n in names if n != "summary.json"})
    return out

  files = stamps()
  assert any("pairs-" in f for f in files) and any("checkpoints" in f for f in files)
  before = _summary(workdir)
  spec = build.teacher_spec(cfg)
  teacher = build.build_teacher(spec, sharding.make_mesh((-1, 1, 1)), sharding.DEFAULT_RULES,
                                jax.random.key(0))
  tokenizer = build.tokenizer_for(cfg)
  prepared = arte_source.prepare_arte(cfg, workdir, teacher, tokenizer)
  assert stamps() == files  # Nothing was redone or rewritten.
  dpo_dir = next(os.path.join(workdir, "arte", d) for d in os.listdir(os.path.join(
      workdir, "arte")) if d.startswith("dpo-"))
  assert [m["step"] for m in read_metrics(dpo_dir) if "loss/dpo" in m] == list(range(1, 9))
  after = _summary(workdir)
  assert {k: v for k, v in after.items() if k != "seconds"} == {
      k: v for k, v in before.items() if k != "seconds"}
  assert prepared.facts["arte pairs"] == before["pairs"]
  records = [{"id": "p001", "prompt": "q01", "domain": ""}] * before["corpus_examples"]
  with pytest.raises(ValueError, match="by another teacher than this run's"):
    arte_source.write_corpus(cfg, teacher.params, teacher.config, tokenizer, records,
                             os.path.join(workdir, "data"), "arte_train")
