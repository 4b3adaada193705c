"""Answer-level metrics (jkd.train.answers): greedy answers, ROUGE-L, the teacher as judge."""

import jax
import numpy as np
import pytest

from jkd.data import corpus as corpus_lib
from jkd.data import model_spec
from jkd.train import answers
from tiny_models import TinyModel

PROMPTS = ["Hi", "Name a colour.", "Count to three", "Why?", "a", "Tell me a story.",
           "Sum 2 and 2", "Say no", "Last one"]


@pytest.fixture(scope="module")
def tiny():
  model = TinyModel(max_position_embeddings=128)
  # Layers scaled up: at init, greedy decoding repeats the last prompt token; scaled, it writes
  # varied text (special tokens included).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x if "embed" in jax.tree_util.keystr(path) else 10 * x,
      model.init(jax.random.key(0)))
  return model, params, model_spec.char_tokenizer(128)


def _reference_judge(model, params, tokenizer, prompts, texts) -> float:
  """float64 NumPy: -sum log p(answer tokens | prompt) / answer tokens, each row run alone."""
  total, count = 0.0, 0
  for prompt, text in zip(prompts, texts):
    prompt_ids = corpus_lib.encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not answer_ids:
      continue
    ids = np.array([prompt_ids + answer_ids])
    logp = model.np_logsoftmax(params, ids)[0]
    n = len(prompt_ids)
    total -= sum(logp[n - 1 + t, a] for t, a in enumerate(answer_ids))
    count += len(answer_ids)
  return total / count


def test_judge_nll_matches_a_float64_reference(tiny):
  model, params, tokenizer = tiny
  # Nine pairs: two judge batches; answers of different lengths, one empty (adds no token).
  texts = ["Hello there", "Blue", "1, 2, 3", "", "b", "Once upon a time", "4", "No.",
           "The end of the list"]
  got = answers.judge_nll(params, model.config, tokenizer, PROMPTS, texts)
  want = _reference_judge(model, params, tokenizer, PROMPTS, texts)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The padding around a row does not change its score.
  alone = answers.judge_nll(params, model.config, tokenizer, PROMPTS[:1], texts[:1])
  np.testing.assert_allclose(alone, _reference_judge(model, params, tokenizer, PROMPTS[:1],
                                                     texts[:1]), rtol=1e-5)


def test_judge_nll_bad_inputs(tiny):
  model, params, tokenizer = tiny
  assert np.isnan(answers.judge_nll(params, model.config, tokenizer, ["Hi"], [""]))
  with pytest.raises(ValueError, match="one answer per prompt"):
    answers.judge_nll(params, model.config, tokenizer, ["Hi", "Yo"], ["a"])
  with pytest.raises(ValueError, match="max_position_embeddings 128"):
    answers.judge_nll(params, model.config, tokenizer, ["Hi"], ["x" * 200])


def test_greedy_answers_do_not_depend_on_the_batch(tiny):
  model, params, tokenizer = tiny
  together = answers.greedy_answers(params, model.config, tokenizer, PROMPTS, 6)
  one_by_one = answers.greedy_answers(params, model.config, tokenizer, PROMPTS, 6,
                                      batch_size=1)
  assert together == one_by_one
  assert len(together) == len(PROMPTS) and len(set(together)) > 1
  # Greedy: each answer token is the argmax of the float64 reference given the prompt and the
  # answer so far (the char tokenizer gives the generated ids back, special tokens included).
  stops = corpus_lib.default_stop_ids(tokenizer)
  for prompt, text in zip(PROMPTS[:4], together):
    prompt_ids = corpus_lib.encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logp = model.np_logsoftmax(params, np.array([prompt_ids + answer_ids]))[0]
    top = logp[len(prompt_ids) - 1:].argmax(-1)
    assert len(answer_ids) <= 6 and top[:len(answer_ids)].tolist() == answer_ids
    if len(answer_ids) < 6:  # It stopped: the next argmax is a stop id.
      assert int(top[len(answer_ids)]) in stops
  with pytest.raises(ValueError, match="max_new_tokens"):
    answers.greedy_answers(params, model.config, tokenizer, PROMPTS, 0)


def test_rouge_l_on_known_subsequences():
  pytest.importorskip("rouge_score")
  # "the cat on a mat" vs "the cat sat on the mat": LCS "the cat on mat" (4 words),
  # P = 4/5, R = 4/6, F1 = 2PR / (P + R) = 8/11.
  assert answers.rouge_l(["the cat on a mat"], ["the cat sat on the mat"]) == pytest.approx(8 / 11)
  # Case and punctuation are not words; no common word, or an empty answer, scores 0.
  assert answers.rouge_l(["Same Words!"], ["same words"]) == pytest.approx(1.0)
  assert answers.rouge_l(["a b", ""], ["c d", "x"]) == 0.0
  # The mean over pairs.
  assert answers.rouge_l(["the cat on a mat", "a b"], ["the cat sat on the mat", "a b"]
                         ) == pytest.approx((8 / 11 + 1) / 2)
  with pytest.raises(ValueError, match="one reference per prediction"):
    answers.rouge_l(["a"], [])
  with pytest.raises(ValueError, match="at least one"):
    answers.rouge_l([], [])
