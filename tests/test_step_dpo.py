"""Step-DPO: step pairs (jkd.data.ranked) read from JSONL into preference pairs whose context is
the prompt and the correct prefix (the prefix inside the assistant turn of the chat template)
and whose labels cover the next step only; the pair's DPO loss against float64 NumPy; the errors;
the ``step_pairs`` batch source."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_preference as rp
from jkd import losses
from jkd.data import model_spec
from jkd.data import ranked
from jkd.train import preference_step
from jkd.train import recipes
from jkd.train import sources
from recipe_configs import load_module
from tiny_models import TinyModel

X = -100
TOK = model_spec.char_tokenizer(128)  # <pad> 0, <eos> 1, <user> 2, <assistant> 3, chars after
EOS, USER, ASSISTANT = 1, 2, 3
EXAMPLE = {"prompt": "2+3*4?", "prefix": "S1: 3*4=12\n", "chosen_step": "S2: 14",
           "rejected_step": "S2: 15!"}


def chars(text):
  return TOK(text, add_special_tokens=False)["input_ids"]


def test_prefix_is_the_start_of_the_assistant_turn():
  out = ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=40)
  # What the chat template renders for the whole answer "prefix + step", less its final <eos>.
  for side in ("chosen", "rejected"):
    answer = EXAMPLE["prefix"] + EXAMPLE[f"{side}_step"]
    full = TOK.apply_chat_template([{"role": "user", "content": EXAMPLE["prompt"]},
                                    {"role": "assistant", "content": answer}],
                                   return_dict=False)
    assert full[-1] == EOS
    n = len(full) - 1
    tokens, labels = out[f"{side}_tokens"], out[f"{side}_labels"]
    assert tokens[:n].tolist() == full[:-1] and (tokens[n:] == 0).all()  # No EOS after a step.
    context = [USER] + chars(EXAMPLE["prompt"]) + [ASSISTANT] + chars(EXAMPLE["prefix"])
    step = chars(EXAMPLE[f"{side}_step"])
    assert tokens[:len(context)].tolist() == context
    # Labels: the step's tokens only (predicted from the last context position on).
    want = [X] * (len(context) - 1) + step + [X] * (40 - len(context) - len(step) + 1)
    assert labels.tolist() == want
  assert out["chosen_tokens"][:len(context)].tolist() == out["rejected_tokens"][
      :len(context)].tolist()


def test_empty_prefix_eos_option_and_plain_prompts():
  first = dict(EXAMPLE, prefix="")
  out = ranked.tokenize_step_pair(first, TOK, seq_len=20, eos=True)
  context = [USER] + chars("2+3*4?") + [ASSISTANT]
  assert out["chosen_tokens"][:len(context)].tolist() == context
  labels = out["chosen_labels"][len(context) - 1:len(context) + 6].tolist()
  assert labels == chars("S2: 14") + [EOS]
  plain = ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=40, chat_template=False)
  ctx = chars("2+3*4?") + chars("S1: 3*4=12\n")
  assert plain["chosen_tokens"][:len(ctx)].tolist() == ctx
  assert (plain["chosen_labels"][:len(ctx) - 1] == X).all()


@pytest.mark.parametrize("change, match", [
    ({"chosen_step": ""}, "chosen_step is an empty step"),
    ({"rejected_step": " \n"}, "rejected_step is an empty step"),
    ({"rejected_step": "S2: 14"}, "chosen_step == rejected_step"),
    ({"prefix": None}, "field 'prefix' must be text"),
    ({"prefix": 3}, "field 'prefix' must be text"),
])
def test_step_pair_errors_name_the_line(tmp_path, change, match):
  bad = dict(EXAMPLE, **change)
  path = tmp_path / "steps.jsonl"
  path.write_text(json.dumps(EXAMPLE) + "\n" + json.dumps(bad) + "\n")
  with pytest.raises(ValueError, match=f"steps.jsonl:2: {match}"):
    ranked.read_step_pairs_jsonl(str(path), TOK, seq_len=40)
  with pytest.raises(ValueError, match=f"^example 1: {match}"):
    ranked.tokenize_step_pairs([EXAMPLE, bad], TOK, seq_len=40)


def test_missing_field_and_bad_json_name_the_line(tmp_path):
  path = tmp_path / "steps.jsonl"
  path.write_text(json.dumps({k: v for k, v in EXAMPLE.items() if k != "prefix"}) + "\n")
  with pytest.raises(ValueError, match=r"steps.jsonl:1: a step pair example needs the field"
                                       r" 'prefix'"):
    ranked.read_step_pairs_jsonl(str(path), TOK, seq_len=40)
  path.write_text(json.dumps(EXAMPLE) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"steps.jsonl:2: invalid JSON"):
    ranked.read_step_pairs_jsonl(str(path), TOK, seq_len=40)


def test_overflow_cuts_the_step_never_the_context():
  n_ctx = 2 + len("2+3*4?") + len("S1: 3*4=12\n")  # <user> prompt <assistant> prefix
  cut = ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=n_ctx + 6)  # "S2: 15!" -> "S2: 15"
  assert cut["rejected_labels"][n_ctx - 1:].tolist() == chars("S2: 15") + [X]
  assert cut["chosen_labels"][n_ctx - 1:].tolist() == chars("S2: 14") + [X]
  assert cut["rejected_tokens"][:n_ctx].tolist() == cut["chosen_tokens"][:n_ctx].tolist()
  assert ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=n_ctx + 6, overflow="drop") is None
  with pytest.raises(ValueError, match=f"needs {n_ctx + 7} tokens .* > seq_len {n_ctx + 6}"):
    ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=n_ctx + 6, overflow="error")
  with pytest.raises(ValueError, match="identical in their first 5 tokens"):
    ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=n_ctx + 5)
  with pytest.raises(ValueError, match="prompt with its prefix is .* tokens but seq_len"):
    ranked.tokenize_step_pair(EXAMPLE, TOK, seq_len=n_ctx)


def test_step_dpo_loss_counts_the_step_tokens_only(rng):
  """Through the step's preference inputs: the policy's and the teacher's (the reference's)
  summed log-probs are over the step tokens only, and the DPO term equals the NumPy formula."""
  examples = [EXAMPLE, dict(EXAMPLE, prefix="", chosen_step="S1: 3*4=12\n",
                            rejected_step="S1: 2+3=5\n")]
  batch = ranked.tokenize_step_pairs(examples, TOK, seq_len=32)
  batch.pop("example_index")
  tiny = TinyModel()
  params, teacher = tiny.init(jax.random.key(0)), tiny.init(jax.random.key(1))
  objective = losses.build_objective({"dpo": {"beta": 0.5}})

  @jax.jit
  def run(p, tp, b):
    inputs, _ = preference_step.preference_inputs(p, tp, b, student_config=tiny.config,
                                                  teacher_config=tiny.config,
                                                  objective=objective)
    return inputs, objective(inputs)

  inputs, (total, metrics) = run(params, teacher, jax.tree.map(jnp.asarray, batch))

  def np_sums(p, side):
    labels = batch[f"{side}_labels"]
    lp = tiny.np_token_logprobs(p, batch[f"{side}_tokens"], np.maximum(labels, 0))
    return np.where(labels != X, lp, 0.0).sum(-1)

  steps = [(len(chars(e["chosen_step"])), len(chars(e["rejected_step"]))) for e in examples]
  assert np.asarray(inputs["policy_chosen"].count).tolist() == [c for c, _ in steps]
  assert np.asarray(inputs["policy_rejected"].count).tolist() == [r for _, r in steps]
  pc, pr, rc, rr = (np_sums(p, side) for p in (params, teacher) for side in ("chosen",
                                                                              "rejected"))
  np.testing.assert_allclose(inputs["policy_chosen"].sum, pc, rtol=1e-5)
  np.testing.assert_allclose(inputs["ref_rejected"].sum, rr, rtol=1e-5)
  np.testing.assert_allclose(total, rp.sigmoid_loss(pc, pr, rc, rr, beta=0.5).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["dpo/rewards/margins"],
                             np.mean(0.5 * ((pc - rc) - (pr - rr))), rtol=1e-4)


def test_step_pairs_source(tmp_path):
  """data.source='step_pairs' serves the pairs (and KTO rows with data.shape='unpaired')."""
  module = load_module("step_dpo")
  cfg = module.get_config("cpu")
  recipes.apply_overrides(cfg, module.make_cpu_data(str(tmp_path)))
  train, evals = sources.make_sources(cfg, 128, tokenizer=TOK)
  batch = next(train)
  assert evals is None and set(batch) == {"chosen_tokens", "chosen_labels", "rejected_tokens",
                                          "rejected_labels"}
  assert batch["chosen_tokens"].shape == (cfg.data.batch_size, cfg.data.seq_len)
  cfg.data.shape = "unpaired"
  kto = next(sources.make_sources(cfg, 128, tokenizer=TOK)[0])
  assert kto["desirable"].tolist() == [True] * 2 + [False] * 2
  cfg.data.update(dict(shape="", path=""))
  with pytest.raises(ValueError, match="data.source='step_pairs' needs data.path"):
    sources.make_sources(cfg, 128, tokenizer=TOK)
  cfg.data.update(dict(path=str(tmp_path / "step_dpo_cpu.jsonl"), batch_size=16))
  with pytest.raises(ValueError, match="8 examples in .* but a batch needs 16"):
    sources.make_sources(cfg, 128, tokenizer=TOK)
