"""Generate, filter, self-imitate (Symbolic KD, I2D2): each critic on hand-made texts, the keep
rule against a reference, a round's statistics, the source's rounds, the recipe end to end with
its per-round metrics, and the bad inputs.

References: tests/reference_qcrd.py (the keep rule, written from docs/methods.md §18) and the
float64 NumPy log-softmax of a tiny model (tests/tiny_models.py).
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from jkd.data import critics
from jkd.data.model_spec import char_tokenizer
from jkd.data.scoring import Candidate
from jkd.train import loop
from jkd.train.sources import self_imitation
from jkd.train.writer import read_metrics
import reference_qcrd as ref
from recipe_configs import load_module
from tiny_models import TinyModel

TINY = TinyModel(max_position_embeddings=256)
CONFIG = TINY.config
PROMPTS = ["Hi there", "Name a color.", "Count to three."]


def cand(text, prompt="p", prompt_ids=(2, 5), ids=(7, 1)):
  return Candidate(prompt, np.asarray(prompt_ids), text, np.asarray(ids), {})


# Functions the dotted-name critics import (this module is on the path under pytest).
def length_reward(prompts, texts):
  return [len(p) + 10 * len(t) for p, t in zip(prompts, texts)]


def two_classes(prompts, texts):
  del prompts
  return [[0.2, 0.8] if "good" in t else [0.9, 0.1] for t in texts]


def one_probability(prompts, texts):
  del prompts
  return [0.25 + 0.5 * ("good" in t) for t in texts]


def raw_logits(prompts, texts):
  del prompts
  return [3.0 for _ in texts]


def unnormalised(prompts, texts):
  del prompts
  return [[0.5, 0.6] for _ in texts]


def wrong_length(prompts, texts):
  del prompts, texts
  return [1.0]


# ---------------------------------------------------------------------------------------------
# The critics.

def test_constraints_critic_scores_the_share_of_constraints_met():
  critic = critics.make_critic("constraints", min_words=2, max_words=4, required=["cat"],
                               forbidden=["dog"], regex=r"\.$")
  texts = ["The cat sat.", "cat", "A dog and a cat ran.", "Concatenate dogs.", "CAT!"]
  # 5 checks each: min words, max words, "cat" (whole word), no "dog", ends with ".".
  assert critic([cand(t) for t in texts]).tolist() == [1.0, 0.6, 0.6, 0.8, 0.6]
  strict = critics.make_critic("constraints", required=("cat",), case_sensitive=True)
  assert strict([cand("CAT."), cand("a cat")]).tolist() == [0.0, 1.0]
  phrase = critics.make_critic("constraints", required="New York", max_words=3)
  assert phrase([cand("in new york"), cand("new cars in york")]).tolist() == [1.0, 0.0]


def test_dotted_and_classifier_critics_call_the_named_functions():
  texts = [cand("good one", prompt="ab"), cand("bad", prompt="c")]
  dotted = critics.make_critic("dotted", fn=f"{__name__}:length_reward")
  assert dotted(texts).tolist() == [82.0, 31.0]
  clf = critics.make_critic("classifier", fn=f"{__name__}:two_classes")
  np.testing.assert_allclose(clf(texts), [0.8, 0.1])
  clf0 = critics.make_critic("classifier", fn=f"{__name__}:two_classes", label=0)
  np.testing.assert_allclose(clf0(texts), [0.2, 0.9])
  one = critics.make_critic("classifier", fn=f"{__name__}:one_probability")
  np.testing.assert_allclose(one(texts), [0.75, 0.25])
  for name, match in (("raw_logits", r"outside \[0, 1\]"), ("unnormalised", "sum to 1")):
    with pytest.raises(ValueError, match=match):
      critics.make_critic("classifier", fn=f"{__name__}:{name}")(texts)
  with pytest.raises(ValueError, match="is not a class"):
    critics.make_critic("classifier", fn=f"{__name__}:two_classes", label=2)(texts)
  with pytest.raises(ValueError, match="one float per text"):
    critics.make_critic("dotted", fn=f"{__name__}:wrong_length")(texts)


def test_teacher_logprob_critic_is_the_mean_completion_logprob():
  teacher = TINY.init(jax.random.key(1))
  critic = critics.make_critic("teacher_logprob", teacher=(teacher, CONFIG), batch_size=2)
  rows = [([2, 44, 77, 3], [50, 60, 70, 1]), ([2, 40, 3], [33, 1]), ([2, 3], [90, 91, 92])]
  got = critic([cand("x", prompt_ids=p, ids=c) for p, c in rows])
  want = []
  for p, c in rows:
    tokens = np.asarray([p + c])
    labels = np.asarray([p[1:] + c + [0]])  # Position t predicts tokens[t + 1].
    lp = TINY.np_token_logprobs(teacher, tokens, labels)[0]
    want.append(lp[len(p) - 1:len(p) - 1 + len(c)].mean())
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_critic_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"unknown critic 'teacher_logprb'; did you mean"
                                       r" \['teacher_logprob'\]"):
    critics.make_critic("teacher_logprb")
  with pytest.raises(ValueError, match="cannot import module 'no_such_module_jkd'"):
    critics.make_critic("dotted", fn="no_such_module_jkd:score")
  with pytest.raises(ValueError, match="has no callable 'missing'"):
    critics.make_critic("classifier", fn=f"{__name__}:missing")
  with pytest.raises(ValueError, match="named 'module.path:function'"):
    critics.make_critic("dotted", fn="not_a_dotted_name")
  with pytest.raises(ValueError, match="scores with the teacher"):
    critics.make_critic("teacher_logprob")
  with pytest.raises(ValueError, match="at least one constraint"):
    critics.make_critic("constraints")
  with pytest.raises(ValueError, match="min_words 5 > max_words 2"):
    critics.make_critic("constraints", min_words=5, max_words=2)
  with pytest.raises(ValueError, match="does not compile"):
    critics.make_critic("constraints", regex="(")
  with pytest.raises(ValueError, match="bad options"):
    critics.make_critic("constraints", min_word=2)


# ---------------------------------------------------------------------------------------------
# The keep rule and a round's statistics.

@pytest.mark.parametrize("fraction,threshold", [(1.0, None), (0.5, None), (0.3, 0.2),
                                                (1.0, 0.5), (0.01, None)])
def test_keep_rule_matches_the_reference(fraction, threshold, rng):
  scores = np.round(rng.uniform(0, 1, 11), 1)  # Rounded: ties at the cut.
  got = critics.keep_mask(scores, keep_fraction=fraction, threshold=threshold)
  np.testing.assert_array_equal(got, ref.keep_mask(scores, fraction, threshold))
  if threshold is None:
    assert got.sum() == math.ceil(fraction * 11)
  else:
    assert got.sum() <= math.ceil(fraction * 11) and (scores[got] >= threshold).all()
  assert critics.keep_mask([0.5, 0.9, 0.5, 0.1], keep_fraction=0.5).tolist() == [
      True, True, False, False]  # Tie at the cut: the earlier sample.
  assert critics.keep_mask([1.0, 2.0], threshold=float("-inf")).tolist() == [True, True]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True])
def test_keep_fraction_outside_0_1_is_an_error(fraction):
  with pytest.raises(ValueError, match=r"keep_fraction must lie in \(0, 1\]"):
    critics.keep_mask([1.0], keep_fraction=fraction)
  with pytest.raises(ValueError, match=r"keep_fraction must lie in \(0, 1\]"):
    make_source(keep_fraction=fraction)


def test_threshold_and_score_errors():
  with pytest.raises(ValueError, match="threshold must be a number"):
    critics.keep_mask([1.0], threshold=float("nan"))
  with pytest.raises(ValueError, match="finite"):
    critics.keep_mask([1.0, float("nan")])


def test_filter_candidates_counts_generated_scored_and_kept():
  texts = ["a b c", "a", "", "a b c", "a b c d e"]  # An empty one and a repeat: never scored.
  critic = critics.make_critic("dotted", fn=f"{__name__}:length_reward")
  out = critics.filter_candidates([cand(t) for t in texts], critic, keep_fraction=0.5)
  scores = [1 + 10 * len(t) for t in ("a b c", "a", "a b c d e")]
  assert [r["completion"] for r in out.kept] == ["a b c", "a b c d e"]  # ceil(0.5 * 3) = 2
  assert out.stats == {"generated": 5.0, "scored": 3.0, "kept": 2.0, "keep_rate": 0.4,
                       "score_all": np.mean(scores), "score_kept": np.mean([51.0, 91.0])}
  none = critics.filter_candidates([cand("a")], critic, threshold=100.0)
  assert none.kept == [] and none.stats["keep_rate"] == 0 and math.isnan(
      none.stats["score_kept"])


# ---------------------------------------------------------------------------------------------
# The source: round 0 from the teacher, then the student's own samples.

def make_source(**options):
  kw = dict(tokenizer=char_tokenizer(128), seq_len=64, batch_size=4, steps_per_round=2,
            critic="teacher_logprob", n=2, keep_fraction=0.5, max_new_tokens=4, seed=5,
            process_index=0, process_count=1)
  kw.update(options)
  return self_imitation.SelfImitationSource(PROMPTS, **kw)


def test_source_filters_the_teacher_then_the_student():
  nets = {name: TINY.init(jax.random.key(i)) for i, name in enumerate(("student", "teacher"))}
  src = make_source()
  src.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)
  src.before_batch(nets["student"])
  first = next(src)
  critic = critics.make_critic("teacher_logprob", teacher=(nets["teacher"], CONFIG))
  sampling = dict(tokenizer=src.tokenizer, critic=critic, n=2, keep_fraction=0.5,
                  max_new_tokens=4, seed=5, batch_size=8)
  want = critics.generate_and_filter(PROMPTS, model=(nets["teacher"], CONFIG), round_index=0,
                                     **sampling)
  assert src._made["records"] == want.kept and src.stats == want.stats
  assert first["tokens"].shape == first["labels"].shape == (4, 64)
  for name in ("keep_rate", "score_all", "score_kept", "kept", "round"):
    assert np.isfinite(first[f"metric/self_imitation/{name}"]).all()
  assert first["metric/self_imitation/keep_rate"][0] == want.stats["keep_rate"] > 0
  # The labels are the kept completions (each row's label ids decode to one of them + EOS).
  completions = {r["completion"] for r in want.kept}
  for labels in first["labels"]:
    ids = labels[labels != -100]
    assert ids[-1] == 1 and src.tokenizer.decode(ids[:-1].tolist()) in completions
  mid = json.loads(json.dumps(src.get_state()))
  second = next(src)
  restored = make_source()
  restored.set_state(mid)
  again = next(restored)
  for k in second:
    np.testing.assert_array_equal(again[k], second[k])
  third = next(src)  # Round 1: the student generates, the same critic filters.
  want = critics.generate_and_filter(PROMPTS, model=(nets["student"], CONFIG), round_index=1,
                                     **sampling)
  assert src._made["records"] == want.kept and third["metric/self_imitation/round"][0] == 1


def test_source_bad_settings():
  with pytest.raises(ValueError, match=r"unknown critic 'classifer'; did you mean"):
    make_source(critic="classifer")
  with pytest.raises(ValueError, match="cannot import module"):
    make_source(critic="dotted", critic_options={"fn": "no_such_module_jkd:f"})
  with pytest.raises(ValueError, match="needs the teacher: call bind_models"):
    next(make_source())
  src = make_source(critic="constraints", critic_options={"min_words": 50}, threshold=1.0)
  teacher = TINY.init(jax.random.key(1))
  src.bind_models(teacher_params=teacher, teacher_config=CONFIG, student_config=CONFIG)
  with pytest.raises(ValueError, match="kept no usable sample of the teacher's"):
    next(src)


# ---------------------------------------------------------------------------------------------
# The recipe end to end: the per-round metrics are logged.

def test_recipe_cpu_logs_keep_rate_and_scores_per_round(tmp_path):
  cfg = load_module("self_imitation").get_config("cpu")
  cfg.train.progress_bar = False
  cfg.checkpoint.async_save = False
  cfg.lock()
  assert cfg.train.steps <= 8 and cfg.self_imitation.steps_per_round * 2 == cfg.train.steps
  result = loop.train(cfg, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == cfg.train.steps
  lines = [m for m in read_metrics(str(tmp_path / "run")) if "loss/ce" in m]
  assert [m["self_imitation/round"] for m in lines] == [0, 0, 1, 1]
  for m in lines:
    assert np.isfinite(m["loss/ce"])
    assert 0 < m["self_imitation/keep_rate"] <= 1
    assert m["self_imitation/score_kept"] >= m["self_imitation/score_all"]
    assert m["self_imitation/kept"] == round(m["self_imitation/keep_rate"]
                                             * m["self_imitation/generated"])
