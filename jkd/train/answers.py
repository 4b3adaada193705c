"""Answer-level metrics: greedy answers to prompts, ROUGE-L between answers, the teacher as judge.

Token-level evaluation (:mod:`jkd.train.evaluate`) scores a student on text the teacher wrote;
these functions score what the student writes itself:

* :func:`greedy_answers`: a model's greedy answers to chat-formatted prompts
  (:func:`jkd.data.corpus.encode_prompt`), stopped at the tokenizer's stop ids
  (:func:`jkd.data.corpus.default_stop_ids`).
* :func:`rouge_l`: the mean ROUGE-L F1 of answers against references (e.g. the teacher's own
  greedy answers), with Google's ``rouge-score`` (``pip install 'jkd[eval]'``).
* :func:`judge_nll`: the teacher as judge: its mean negative log-likelihood per token of the
  answers given their prompts (lower: text the teacher finds more likely).

``bench/quality.py`` reports both for every method of its leaderboard.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd import models
from jkd import sampling
from jkd.data import corpus as corpus_lib

PyTree = Any

#: Rows of one judge forward pass: prompts are scored this many at a time.
JUDGE_BATCH = 8

#: Judge sequences are right-padded to a multiple of this (one compilation per length bucket).
JUDGE_LENGTH_BUCKET = 64


def greedy_answers(params: PyTree, config: models.ModelConfig, tokenizer, prompts: Sequence[str],
                   max_new_tokens: int, *, batch_size: int = 32) -> list[str]:
  """Greedy answers of a model to prompts in the tokenizer's chat template.

  Args:
    params: the model's parameters.
    config: its :class:`jkd.models.ModelConfig`.
    tokenizer: a ``transformers`` tokenizer with a chat template (the teacher's).
    prompts: user-turn texts.
    max_new_tokens: most tokens per answer.
    batch_size: prompts per :func:`jkd.sampling.generate` call.

  Returns:
    One decoded answer per prompt, without its stop token. Other special tokens the model wrote
    are kept in the text (``skip_special_tokens=False``): a degenerate answer stays visible, and
    :func:`judge_nll`, which tokenizes the text again, scores them.

  Raises:
    ValueError: no prompts, or ``max_new_tokens``/``batch_size`` below 1.
  """
  if not prompts:
    raise ValueError("greedy_answers needs at least one prompt.")
  for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1 (got {value}).")
  stops = corpus_lib.default_stop_ids(tokenizer)
  answers = []
  for start in range(0, len(prompts), int(batch_size)):
    chunk = list(prompts[start:start + int(batch_size)])
    ids = [corpus_lib.encode_prompt(tokenizer, p) for p in chunk]
    out = sampling.generate(params, ids, config=config, key=None, greedy=True,
                            max_new_tokens=int(max_new_tokens), stop_ids=stops)
    for row, n in zip(np.asarray(out.tokens)[:len(chunk)], np.asarray(out.lengths)):
      row = row[:int(n)].tolist()
      if row and row[-1] in stops:
        row = row[:-1]
      answers.append(tokenizer.decode(row, skip_special_tokens=False))
  return answers


def _rouge_scorer():
  try:
    from rouge_score import rouge_scorer  # noqa: PLC0415
  except ImportError as e:
    raise ImportError("rouge_l needs the 'rouge-score' package (Google's ROUGE), part of the"
                      " eval extra: pip install 'jkd[eval]' (or pip install rouge-score)."
                      ) from e
  return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
  """Mean ROUGE-L F1 of ``predictions[i]`` against ``references[i]``.

  ROUGE-L (Lin, *ROUGE: A Package for Automatic Evaluation of Summaries*, ACL 2004 workshop):
  with ``L`` the length of the longest common subsequence of the two word sequences,
  ``P = L / len(prediction)``, ``R = L / len(reference)``, ``F1 = 2PR / (P + R)`` (0 when
  ``L = 0``, e.g. an empty answer). Words are ``rouge-score``'s default tokens: lowercased runs
  of ``[a-z0-9]``, no stemming.

  Args:
    predictions: the answers scored.
    references: one reference per prediction.

  Returns:
    The mean F1 in ``[0, 1]``.

  Raises:
    ValueError: no pairs, or lists of different lengths.
    ImportError: ``rouge-score`` is not installed.

  >>> round(rouge_l(["the cat sat"], ["the cat sat on the mat"]), 4)  # L=3, P=1, R=0.5
  0.6667
  """
  if len(predictions) != len(references):
    raise ValueError(f"rouge_l got {len(predictions)} predictions but {len(references)}"
                     " references: give one reference per prediction.")
  if not predictions:
    raise ValueError("rouge_l needs at least one prediction/reference pair.")
  scorer = _rouge_scorer()
  return float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure
                        for pred, ref in zip(predictions, references)]))


@functools.partial(jax.jit, static_argnames="config")
def _nll_sums(params: PyTree, tokens: jax.Array, labels: jax.Array, *,
              config: models.ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Per-row sum of ``-log p(labels)`` over the labelled positions, and their count."""
  mask = labels >= 0
  logits = models.apply(params, tokens, config=config).logits
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, -picked, 0.0), axis=-1), jnp.sum(mask, axis=-1)


def _judge_rows(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_len: int
                ) -> list[tuple[list[int], int]]:
  """``(prompt ids + answer ids, number of prompt ids)`` per pair."""
  rows = []
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    ids = corpus_lib.encode_prompt(tokenizer, prompt)
    answer_ids = [int(t) for t in tokenizer(answer, add_special_tokens=False)["input_ids"]]
    if len(ids) + len(answer_ids) > max_len:
      raise ValueError(f"prompt {i} and its answer take {len(ids) + len(answer_ids)} tokens,"
                       f" more than the judge's max_position_embeddings {max_len}: shorten"
                       " the answers (max_new_tokens).")
    rows.append((ids + answer_ids, len(ids)))
  return rows


def judge_nll(teacher_params: PyTree, teacher_config: models.ModelConfig, tokenizer,
              prompts: Sequence[str], answers: Sequence[str]) -> float:
  """The teacher as judge: its mean NLL per answer token of ``answers`` given ``prompts``.

  Each answer is tokenized (no special tokens) after its prompt in the chat template
  (:func:`jkd.data.corpus.encode_prompt`, which ends with the assistant's turn header); the
  result is ``sum_i sum_t -log p(a_{i,t} | prompt_i, a_{i,<t}) / sum_i |a_i|`` over all answer
  tokens (the answers' stop tokens are not scored; an empty answer adds nothing). Rows are
  right-padded (causal attention: padding cannot affect them) to a multiple of
  :data:`JUDGE_LENGTH_BUCKET` and scored :data:`JUDGE_BATCH` at a time in one jitted forward
  pass, in float32.

  Args:
    teacher_params: the judge's parameters.
    teacher_config: its :class:`jkd.models.ModelConfig`.
    tokenizer: the tokenizer of the judge (and of the answers).
    prompts: user-turn texts.
    answers: one answer text per prompt.

  Returns:
    Nats per token; NaN when the answers hold no token at all.

  Raises:
    ValueError: lists of different lengths or empty, or a prompt + answer longer than the
      judge's ``max_position_embeddings``.
  """
  if len(prompts) != len(answers):
    raise ValueError(f"judge_nll got {len(prompts)} prompts but {len(answers)} answers: give"
                     " one answer per prompt.")
  if not prompts:
    raise ValueError("judge_nll needs at least one prompt/answer pair.")
  rows = _judge_rows(tokenizer, prompts, answers, int(teacher_config.max_position_embeddings))
  length = -(-max(len(r) for r, _ in rows) // JUDGE_LENGTH_BUCKET) * JUDGE_LENGTH_BUCKET
  length = min(length, int(teacher_config.max_position_embeddings))
  total, count = 0.0, 0
  for start in range(0, len(rows), JUDGE_BATCH):
    tokens = np.zeros((JUDGE_BATCH, length), np.int32)  # Padding after each row, and empty rows.
    labels = np.full((JUDGE_BATCH, length), -1, np.int32)  # -1: not scored.
    for j, (ids, n_prompt) in enumerate(rows[start:start + JUDGE_BATCH]):
      tokens[j, :len(ids)] = ids
      labels[j, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]  # position t predicts token t + 1
    sums, counts = _nll_sums(teacher_params, jnp.asarray(tokens),
                             jnp.asarray(labels), config=teacher_config)
    total += float(np.sum(np.asarray(sums, np.float64)))
    count += int(np.sum(np.asarray(counts)))
  return total / count if count else math.nan
