"""TPO: the listwise loss (jkd.losses.listwise) against the float64 NumPy reference of
reference_listwise.py, its gradient, its K = 2 relation to DPO, masked (missing) responses, the
ranked-list JSONL reader (jkd.data.ranked) and its errors, and a list batch in the train step."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference_listwise as rl
import reference_preference as rp
from jkd import losses
from jkd import train
from jkd.data import model_spec
from jkd.data import ranked
from jkd.losses import listwise
from jkd.train import preference_step
from jkd.train import recipes
from jkd.train import sources
from recipe_configs import load_module
from tiny_models import TinyModel

X = -100
TOK = model_spec.char_tokenizer(128)  # <pad> 0, <eos> 1, <user> 2, <assistant> 3, chars after
EOS, USER, ASSISTANT = 1, 2, 3


def chars(text):
  return TOK(text, add_special_tokens=False)["input_ids"]


def lists(rng, b=4, k=5, *, scale=20.0):
  """Random summed log-probs ``[B, K]``, graded scores with ties (never all equal in a list)
  and a mask keeping 2 to K responses per list."""
  policy = -rng.uniform(1.0, scale, (b, k))
  ref = policy + rng.normal(0.0, 3.0, (b, k))
  scores = rng.integers(0, 4, (b, k)).astype(np.float64)
  mask = np.zeros((b, k), bool)
  for i in range(b):
    n = int(rng.integers(2, k + 1))
    mask[i, rng.permutation(k)[:n]] = True
    while len(set(scores[i, mask[i]])) < 2:
      scores[i] = rng.integers(0, 4, k)
  return policy, ref, scores, mask


#: tpo_loss under jit (its options static): one compilation per shape and option set.
tpo = jax.jit(listwise.tpo_loss, static_argnames=("beta", "weighting", "gain"))

OPTIONS = [dict(weighting="lambda", gain="exp2"), dict(weighting="lambda", gain="linear"),
           dict(weighting="uniform")]


def _ref_kw(options):
  return dict(weighting=options["weighting"], gain_kind=options.get("gain", "exp2"))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_tpo_loss_matches_numpy(options, rng):
  policy, ref, scores, mask = lists(rng)
  got = tpo(jnp.asarray(policy, jnp.float32), jnp.asarray(ref, jnp.float32),
          jnp.asarray(scores, jnp.float32), jnp.asarray(mask), beta=0.5, **options)
  want = rl.tpo_loss(policy, ref, scores, mask, beta=0.5, **_ref_kw(options))
  assert got.shape == (4,) and got.dtype == jnp.float32
  assert (want > 0).all()
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o.values()))
def test_tpo_gradient_matches_finite_differences(options, rng, x64):
  policy, ref, scores, mask = lists(rng, b=3, k=4, scale=5.0)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(listwise.tpo_loss(
      p, jnp.asarray(ref), jnp.asarray(scores), jnp.asarray(mask), beta=1.0, **options))))(
          jnp.asarray(policy))
  want = rl.numerical_grad(lambda p: rl.tpo_loss(p, ref, scores, mask, beta=1.0,
                                                 **_ref_kw(options)).sum(), policy)
  assert np.abs(want).max() > 1e-3
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-9)
  assert (np.asarray(grad)[~mask] == 0).all()  # Absent responses get no gradient.


def test_k2_uniform_is_dpo_and_lambda_a_scaled_dpo(rng):
  pc, pr = -rng.uniform(1, 20, 6), -rng.uniform(1, 20, 6)
  rc, rr = pc + rng.normal(0, 2, 6), pr + rng.normal(0, 2, 6)
  # Put the chosen response first in some lists and second in others.
  swap = np.array([False, True, False, True, True, False])
  first = lambda a, b: np.where(swap, b, a)  # noqa: E731
  policy = np.stack([first(pc, pr), first(pr, pc)], 1)
  ref = np.stack([first(rc, rr), first(rr, rc)], 1)
  v_hi, v_lo = 1.0 + rng.uniform(0, 2, 6), rng.uniform(-1, 0.5, 6)
  scores = np.stack([first(v_hi, v_lo), first(v_lo, v_hi)], 1)
  dpo = rp.sigmoid_loss(pc, pr, rc, rr, beta=0.3)
  args = [jnp.asarray(a, jnp.float32) for a in (policy, ref, scores)]
  ones = jnp.ones((6, 2), bool)
  uniform = tpo(*args, ones, beta=0.3, weighting="uniform")
  np.testing.assert_allclose(uniform, dpo, rtol=1e-5)
  np.testing.assert_allclose(uniform, dpo_lib(pc, pr, rc, rr, beta=0.3), rtol=1e-5)
  # Two responses sit at ranks 1 and 2 whatever their rewards: |1/D(1) - 1/D(2)| = 1 - 1/log2 3.
  swap_weight = 1.0 - 1.0 / math.log2(3.0)
  exp2 = tpo(*args, ones, beta=0.3)
  np.testing.assert_allclose(exp2, (2 ** v_hi - 2 ** v_lo) * swap_weight * dpo, rtol=1e-5)
  linear = tpo(*args, ones, beta=0.3, gain="linear")
  np.testing.assert_allclose(linear, (v_hi - v_lo) * swap_weight * dpo, rtol=1e-5)


def dpo_lib(pc, pr, rc, rr, **kw):
  return losses.dpo_loss(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), **kw)


def test_missing_responses_are_masked_out(rng):
  """A list of 3 padded to K = 5 with garbage equals the list itself, whatever the order."""
  policy, ref, scores, _ = lists(rng, b=1, k=3)
  scores[0] = [2.0, 0.0, 1.0]
  padded = [np.concatenate([x, fill], 1) for x, fill in
            ((policy, [[np.nan, -1e30]]), (ref, [[5.0, np.inf]]), (scores, [[np.nan, 9.0]]))]
  mask = np.array([[True, True, True, False, False]])
  perm = np.array([3, 2, 0, 4, 1])  # The same list, shuffled with its padding.
  for options in OPTIONS:
    def loss(p, r, v, m):
      return tpo(*(jnp.asarray(x, jnp.float32) for x in (p, r, v)), jnp.asarray(m), **options)
    want = loss(policy, ref, scores, np.ones((1, 3), bool))
    np.testing.assert_allclose(loss(*padded, mask), want, rtol=1e-6)
    np.testing.assert_allclose(loss(*(x[:, perm] for x in padded), mask[:, perm]), want,
                               rtol=1e-6)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(listwise.tpo_loss(
        p, jnp.asarray(padded[1], jnp.float32), jnp.asarray(padded[2], jnp.float32),
        jnp.asarray(mask), **options))))(jnp.asarray(padded[0], jnp.float32))
    assert np.isfinite(grad).all() and (grad[0, 3:] == 0).all()


def test_a_list_without_preferences_costs_nothing():
  z = jnp.zeros((2, 3))
  scores = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 7.0]])
  mask = jnp.array([[True, True, True], [True, False, False]])  # All tied; one response.
  for weighting in ("lambda", "uniform"):
    assert tpo(z, z, scores, mask, weighting=weighting).tolist() == [0.0, 0.0]


def test_lambda_weights_follow_the_current_reward_ranking():
  """Swapping which response the policy ranks first moves the weights (ranks by rewards)."""
  v, m = jnp.array([[2.0, 1.0, 0.0]]), jnp.ones((1, 3), bool)
  d = lambda t: 1 / math.log2(1 + t)  # noqa: E731
  w = listwise.lambda_weights(v, jnp.array([[0.0, 1.0, 2.0]]), m)  # Ranks 3, 2, 1.
  np.testing.assert_allclose(w[0, 0, 2], (4 - 1) * abs(d(3) - d(1)), rtol=1e-6)
  np.testing.assert_allclose(w[0, 0, 1], (4 - 2) * abs(d(3) - d(2)), rtol=1e-6)
  assert listwise.reward_ranks(jnp.array([[1.0, 1.0, 3.0]]), m).tolist() == [[2, 3, 1]]


def test_bf16_inputs_compute_in_float32(rng):
  policy, ref, scores, mask = lists(rng)
  got = tpo(*(jnp.asarray(x, jnp.bfloat16) for x in (policy, ref, scores)), jnp.asarray(mask))
  as_bf16 = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (policy, ref, scores)]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, rl.tpo_loss(*as_bf16, mask), rtol=1e-4, atol=1e-5)


def test_ranking_metrics_match_numpy(rng):
  policy, ref, scores, mask = lists(rng, b=6)
  got = jax.jit(functools.partial(listwise.ranking_metrics, beta=0.2))(
      *(jnp.asarray(x, jnp.float32) for x in (policy, ref, scores)), jnp.asarray(mask))
  want = rl.ranking_metrics(policy, ref, scores, mask, beta=0.2)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_tpo_term_and_its_errors(rng):
  policy, ref, scores, mask = lists(rng)
  lp = lambda s: losses.SequenceLogprobs(sum=jnp.asarray(s, jnp.float32), mean=None,  # noqa
                                         count=None)
  inputs = {"policy_list": lp(policy), "ref_list": lp(ref),
            "list_scores": jnp.asarray(scores, jnp.float32), "list_mask": jnp.asarray(mask)}
  total, m = jax.jit(losses.build_objective({"tpo": {"beta": 0.5, "gain": "linear"}}))(inputs)
  np.testing.assert_allclose(total, rl.tpo_loss(policy, ref, scores, mask, beta=0.5,
                                                gain_kind="linear").mean(), rtol=2e-5)
  assert "tpo/rewards/ranking_accuracy" in m and "tpo/rewards/margins" in m
  with pytest.raises(ValueError, match="weighting must be one of"):
    losses.build_objective({"tpo": {"weighting": "listnet"}})
  with pytest.raises(ValueError, match="gain must be one of"):
    losses.build_objective({"tpo": {"gain": "log"}})
  with pytest.raises(ValueError, match="beta must be > 0"):
    losses.build_objective({"tpo": {"beta": 0.0}})
  with pytest.raises(ValueError, match="K >= 2 responses"):
    listwise.tpo_loss(jnp.zeros((2, 1)), jnp.zeros((2, 1)), jnp.zeros((2, 1)))
  with pytest.raises(ValueError, match="scores has shape"):
    listwise.tpo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="mask must be a bool"):
    listwise.tpo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)))


# ------------------------------------------------------------------------------------------------
# The JSONL shape {"prompt", "responses", "scores"}


def test_tokenize_ranked_layout_chat_template_and_padding():
  ex = {"prompt": "Hi", "responses": ["ab", "c"], "scores": [0.5, 2]}
  out = ranked.tokenize_ranked(ex, TOK, seq_len=10, list_size=3)
  prompt = [USER] + chars("Hi") + [ASSISTANT]
  assert prompt == TOK.apply_chat_template([{"role": "user", "content": "Hi"}],
                                           add_generation_prompt=True, return_dict=False)
  a, b = chars("ab")
  (c,) = chars("c")
  assert out["list_tokens"].tolist() == [prompt + [a, b, EOS, 0, 0, 0],
                                         prompt + [c, EOS, 0, 0, 0, 0], [0] * 10]
  assert out["list_labels"].tolist() == [[X, X, X, a, b, EOS, X, X, X, X],
                                         [X, X, X, c, EOS, X, X, X, X, X], [X] * 10]
  assert out["list_scores"].tolist() == [0.5, 2.0, 0.0]
  assert out["list_mask"].tolist() == [True, True, False]
  plain = ranked.tokenize_ranked(ex, TOK, seq_len=6, chat_template=False)
  assert plain["list_tokens"].shape == (2, 6)  # list_size: the example's own.
  assert plain["list_tokens"][1].tolist() == chars("Hi") + [c, EOS, 0, 0]
  cut = ranked.tokenize_ranked(ex, TOK, seq_len=6)  # "ab" + EOS: EOS cut.
  assert cut["list_tokens"][0].tolist() == prompt + [a, b]
  assert cut["list_labels"][0].tolist() == [X, X, X, a, b, X]
  assert ranked.tokenize_ranked(ex, TOK, seq_len=6, overflow="drop") is None
  with pytest.raises(ValueError, match="needs 7 tokens .* > seq_len 6"):
    ranked.tokenize_ranked(ex, TOK, seq_len=6, overflow="error")


def test_read_ranked_jsonl_pads_to_the_longest_list(tmp_path):
  lines = [{"prompt": "a", "responses": ["x", "y"], "scores": [1, 0]},
           {"prompt": "b", "responses": ["x", "y", "z"], "scores": [0, 1, 1], "id": 7}]
  path = tmp_path / "lists.jsonl"
  path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
  out = ranked.read_ranked_jsonl(str(path), TOK, seq_len=8)
  assert out["list_tokens"].shape == (2, 3, 8) and out["list_labels"].shape == (2, 3, 8)
  assert out["list_mask"].tolist() == [[True, True, False], [True, True, True]]
  assert out["list_scores"].tolist() == [[1, 0, 0], [0, 1, 1]]
  assert out["example_index"].tolist() == [0, 1]
  assert out["list_scores"].dtype == np.float32 and out["list_tokens"].dtype == np.int32


@pytest.mark.parametrize("line, match", [
    ({"prompt": "a", "responses": ["x", "y"], "scores": [1, 1]},
     r"scores are not a ranking: all 2 scores are equal"),
    ({"prompt": "a", "responses": ["x", "y"], "scores": [1, float("nan")]},
     r"scores are not a ranking: scores\[1\] is nan"),
    ({"prompt": "a", "responses": ["x", "y"], "scores": [1, 0, 2]},
     r"scores are not a ranking: 3 scores for 2 responses"),
    ({"prompt": "a", "responses": ["x"], "scores": [1]},
     r"scores are not a ranking: 1 response\(s\); a ranked list needs"),
    ({"prompt": "a", "responses": ["x", "y"], "scores": [True, 0]},
     r"scores are not a ranking: scores\[0\] is True"),
    ({"prompt": "a", "responses": ["x", "y"], "scores": "10"},
     r"scores are not a ranking: 'scores' must be a list of numbers"),
    ({"prompt": "a", "responses": ["x", " "], "scores": [1, 0]}, r"responses\[1\] is empty"),
    ({"prompt": "a", "responses": ["x", "x"], "scores": [1, 0]},
     r"responses\[0\] and responses\[1\] are the same text"),
    ({"prompt": "a", "responses": "x", "scores": [1, 0]}, r"'responses' must be a list"),
    ({"prompt": "a", "scores": [1, 0]}, r"a ranked list example needs the field 'responses'"),
])
def test_ranked_errors_name_the_line(tmp_path, line, match):
  good = {"prompt": "a", "responses": ["x", "y"], "scores": [1, 0]}
  path = tmp_path / "lists.jsonl"
  path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
  with pytest.raises(ValueError, match=f"lists.jsonl:2: {match}"):
    ranked.read_ranked_jsonl(str(path), TOK, seq_len=8)
  with pytest.raises(ValueError, match=f"^example 1: {match}"):
    ranked.tokenize_ranked_lists([good, line], TOK, seq_len=8)


def test_ranked_list_size_errors():
  ex = {"prompt": "a", "responses": ["x", "y", "z"], "scores": [2, 1, 0]}
  with pytest.raises(ValueError, match="3 responses but the list size is 2"):
    ranked.tokenize_ranked(ex, TOK, seq_len=8, list_size=2)
  with pytest.raises(ValueError, match="list_size must be an int >= 2"):
    ranked.tokenize_ranked_lists([ex], TOK, seq_len=8, list_size=1)


# ------------------------------------------------------------------------------------------------
# A list batch in the train step

TINY = TinyModel()


def test_list_batch_step_equals_numpy_reference(rng):
  """The student and the teacher (the reference) run over the B * K rows; loss/tpo and
  train/tokens against float64 NumPy log-softmax of each row run alone."""
  b, k, t = 3, 3, 10
  ex = ranked.synthetic_ranked_examples(b, t, 128, list_size=k, seed=3)
  ex["list_scores"] = rng.uniform(0, 2, (b, k)).astype(np.float32)
  params, teacher = TINY.init(jax.random.key(0)), TINY.init(jax.random.key(1))
  objective = losses.build_objective({"tpo": {"beta": 0.5}, "ce": {"term": "cross_entropy",
                                                                    "weight": 0.0}})
  step = jax.jit(train.make_train_step(student_config=TINY.config, teacher_config=TINY.config,
                                       objective=objective, optimizer=optax.sgd(0.0),
                                       schedule=lambda s: 0.0))
  state = train.init_state(params, optax.sgd(0.0), objective)

  def logps(p):
    rows = TINY.np_token_logprobs(p, ex["list_tokens"].reshape(b * k, t),
                                  np.maximum(ex["list_labels"], 0).reshape(b * k, t))
    return np.where(ex["list_labels"].reshape(b * k, t) != X, rows, 0).sum(-1).reshape(b, k)

  want = rl.tpo_loss(logps(params), logps(teacher), ex["list_scores"], ex["list_mask"],
                     beta=0.5).mean()
  _, m = step(state, jax.tree.map(jnp.asarray, ex), jax.random.key(0), teacher)
  np.testing.assert_allclose(m["loss/tpo"], want, rtol=1e-4)
  assert float(m["train/tokens"]) == float((ex["list_labels"] != X).sum())
  # The cross-entropy term reads the best-scored response of each list.
  best = [max(np.flatnonzero(ex["list_mask"][i]), key=lambda j: (ex["list_scores"][i, j], -j))
          for i in range(b)]
  labels = np.stack([ex["list_labels"][i, j] for i, j in enumerate(best)])
  token_lp = TINY.np_token_logprobs(params, np.stack([ex["list_tokens"][i, j]
                                                      for i, j in enumerate(best)]),
                                    np.maximum(labels, 0))
  np.testing.assert_allclose(m["loss/ce"], -token_lp[labels != X].mean(), rtol=1e-4)
  # A precomputed reference in the batch gives the same loss without the teacher.
  given = dict(ex, reference_list_logps=logps(teacher).astype(np.float32))
  only_tpo = losses.build_objective({"tpo": {"beta": 0.5}})
  assert not preference_step.runs_teacher(only_tpo, given.keys())
  assert preference_step.runs_teacher(only_tpo, ex.keys())

  @jax.jit
  def without_teacher(p, batch):
    inputs, _ = preference_step.preference_inputs(p, None, batch, student_config=TINY.config,
                                                  teacher_config=None, objective=only_tpo)
    return only_tpo(inputs)[0]
  np.testing.assert_allclose(without_teacher(params, jax.tree.map(jnp.asarray, given)), want,
                             rtol=1e-4)
  rows, teacher_rows, seq = preference_step.work({n: v.shape for n, v in ex.items()}, only_tpo)
  assert (rows, teacher_rows, seq) == (b * k, b * k, t)


def test_bad_list_batches_are_clear_errors():
  ex = ranked.synthetic_ranked_examples(2, 8, 128, list_size=3)
  with pytest.raises(ValueError, match=r"a list batch needs .*missing \['list_scores'\]"):
    preference_step._check({k: v for k, v in ex.items() if k != "list_scores"})
  with pytest.raises(ValueError, match=r"list_scores has shape \[2, 2\]"):
    preference_step._check(dict(ex, list_scores=ex["list_scores"][:, :2]))


def test_ranked_and_synthetic_ranked_sources(tmp_path):
  """data.source='ranked' serves the recipe's JSONL lists, 'synthetic_ranked' random ones."""
  module = load_module("tpo")
  cfg = module.get_config("cpu")
  recipes.apply_overrides(cfg, module.make_cpu_data(str(tmp_path)))
  train_source, evals = sources.make_sources(cfg, 128, tokenizer=TOK)
  batch = next(train_source)
  assert evals is None and list(batch) == list(ranked.LIST_FIELDS)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  assert batch["list_tokens"].shape == (b, 4, t) and batch["list_mask"].shape == (b, 4)
  assert batch["list_mask"].sum(1).min() >= 2
  cfg.data.update(dict(source="synthetic_ranked", num_examples=8))
  batch = next(sources.make_sources(cfg, 128)[0])
  assert batch["list_tokens"].shape == (b, 4, t) and batch["list_scores"].dtype == np.float32
  cfg.data.shape = "unpaired"
  with pytest.raises(ValueError, match="serves ranked lists: data.shape must be ''"):
    sources.make_sources(cfg, 128)
