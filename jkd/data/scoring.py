"""Scoring completions for preference pairs: the sequence layout, batched log-probs, scorers.

A scorer maps sampled completions (:class:`Candidate`) to floats, higher is better;
:func:`jkd.data.preference.make_pairs` keeps the best and the worst of each prompt's samples.
The registry :data:`SCORERS` holds ``teacher_logprob``, ``length``, ``reward_fn`` and
``exact_match``; :func:`register_scorer` adds yours.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd.losses.sequences import sequence_logprobs
from jkd.losses.tokens import IGNORE_INDEX
from jkd.models import transformer
from jkd.models.config import ModelConfig


def sequence_layout(prompt: Sequence[int], completion: Sequence[int], seq_len: int,
            pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``prompt + completion`` right-padded, with next-token labels on the completion only.

  Args:
    prompt: ``P`` prompt ids.
    completion: ``L`` completion ids (``P + L <= seq_len``).
    seq_len: output length.
    pad_id: padding token.

  Returns:
    ``([seq_len] tokens, [seq_len] labels)`` int32; ``labels[t] = tokens[t + 1]`` for
    ``P - 1 <= t < P + L - 1``, else ``-100``.

  >>> [x.tolist() for x in sequence_layout([7, 8], [9], 4, 0)]
  [[7, 8, 9, 0], [-100, 9, -100, -100]]
  """
  ids = list(prompt) + list(completion)
  tokens = np.full(seq_len, pad_id, np.int32)
  labels = np.full(seq_len, IGNORE_INDEX, np.int32)
  tokens[:len(ids)] = ids
  # Position t predicts tokens[t + 1]; it counts when tokens[t + 1] is a completion token.
  labels[len(prompt) - 1:len(ids) - 1] = ids[len(prompt):]
  return tokens, labels


# ------------------------------------------------------------------------------------------------
# Log-probs of completions


class Candidate(NamedTuple):
  """One sampled completion, as a scorer sees it.

  Attributes:
    prompt: the prompt text (as given, before any chat template).
    prompt_ids: ``[P]`` the ids the policy was conditioned on.
    completion: the completion text (stop token removed).
    completion_ids: ``[L]`` the sampled ids, the stop token included when one was sampled.
    example: the prompt's record (e.g. ``{"prompt": ..., "answer": ...}``).
  """
  prompt: str
  prompt_ids: np.ndarray
  completion: str
  completion_ids: np.ndarray
  example: Mapping[str, Any]


#: A scorer: candidates -> ``[len(candidates)]`` float scores (higher is better).
Scorer = Callable[[Sequence[Candidate]], np.ndarray]
#: Scorer name -> factory ``(**options) -> Scorer``. Add yours with :func:`register_scorer`.
SCORERS: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
  """Decorator: registers a scorer factory in :data:`SCORERS`."""
  def decorator(factory):
    SCORERS[name] = factory
    return factory
  return decorator


def make_scorer(name: str, **options) -> Scorer:
  """The scorer ``name`` of :data:`SCORERS`, built with its ``options``.

  >>> s = make_scorer("length")
  >>> s([Candidate("p", np.array([1]), "ab", np.array([5, 6]), {})]).tolist()
  [2.0]
  """
  if name not in SCORERS:
    near = difflib.get_close_matches(name, SCORERS, n=3)
    raise ValueError(f"unknown scorer {name!r}; registered: {sorted(SCORERS)}"
                     + (f" (did you mean {near}?)" if near else "."))
  return SCORERS[name](**options)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, tokens, labels, *, config: ModelConfig):
  """Summed completion log-probs ``[B]`` and completion token counts ``[B]``."""
  logits = transformer.apply(params, tokens, config=config).logits
  lp = sequence_logprobs(logits, labels)
  return lp.sum, lp.count


def batched_logprobs(params, config: ModelConfig, tokens: np.ndarray, labels: np.ndarray,
                     rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Summed completion log-probs of ``[N, T]`` sequences, one jitted forward per batch.

  Args:
    params, config: the model.
    tokens: ``[N, T]`` int token ids.
    labels: ``[N, T]`` next-token labels, ``-100`` where nothing counts.
    rows: sequences per forward (fewer, a power of two, when ``N`` is small); the last batch
      is padded so every batch has one shape.

  Returns:
    ``([N] float32 sums, [N] int counts of completion tokens)``.
  """
  sums, counts = [], []
  rows = min(rows, 1 << max(len(tokens) - 1, 0).bit_length())  # a power of two for few rows
  for start in range(0, len(tokens), rows):
    t, l = tokens[start:start + rows], labels[start:start + rows]
    k = len(t)
    if k < rows:  # pad the batch (rows with no label: sum 0) so no new shape compiles
      t = np.concatenate([t, np.zeros((rows - k, t.shape[1]), t.dtype)])
      l = np.concatenate([l, np.full((rows - k, l.shape[1]), IGNORE_INDEX, l.dtype)])
    s, c = _forward(params, jnp.asarray(t), jnp.asarray(l), config=config)
    sums.append(np.asarray(s)[:k])
    counts.append(np.asarray(c)[:k])
  return np.concatenate(sums).astype(np.float32), np.concatenate(counts)


def check_ids(ids: np.ndarray, vocab: int, what: str) -> None:
  """Raises ``ValueError`` when ``ids`` holds a token outside ``[0, vocab)``."""
  if ids.size and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"{what} holds token ids outside the model's vocabulary [0, {vocab});"
                     " were they tokenized for another model?")


@register_scorer("teacher_logprob")
def teacher_logprob_scorer(*, params, config: ModelConfig, batch_size: int = 8,
                           bucket: int = 64) -> Scorer:
  """Mean per-token log-likelihood of the completion under the teacher, given the prompt.

  ``(1/L) sum_t log p_teacher(y_t | x, y_<t)`` over the sampled tokens (the stop token
  included). Teacher and policy must share the tokenizer.

  Args:
    params, config: the teacher.
    batch_size: sequences per forward.
    bucket: sequence lengths are padded to a multiple of this (fewer compilations).
  """
  def score(candidates: Sequence[Candidate]) -> np.ndarray:
    longest = max(len(c.prompt_ids) + len(c.completion_ids) for c in candidates)
    t = -(-longest // bucket) * bucket
    tokens, labels = map(np.stack, zip(*(sequence_layout(c.prompt_ids, c.completion_ids, t, 0)
                                         for c in candidates)))
    check_ids(tokens, config.vocab_size, "a prompt or completion")
    sums, counts = batched_logprobs(params, config, tokens, labels, batch_size)
    return sums / np.maximum(counts, 1)
  return score


@register_scorer("length")
def length_scorer() -> Scorer:
  """The number of sampled tokens (a toy metric, for tests: longer is "better")."""
  return lambda cands: np.asarray([len(c.completion_ids) for c in cands], np.float64)


def resolve_callable(name: str) -> Callable:
  """A function from its dotted name ``module.path:function`` (imported with importlib)."""
  if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
    raise ValueError(f"a reward function is named 'module.path:function', got {name!r}.")
  module_name, attr = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"cannot import module {module_name!r} of reward function {name!r}: {e}."
                     " Is it on PYTHONPATH?") from None
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
  if not callable(fn):
    raise ValueError(f"{module_name!r} has no callable {attr!r} (reward function {name!r}).")
  return fn


@register_scorer("reward_fn")
def reward_fn_scorer(*, fn: str | Callable[[str, str], float]) -> Scorer:
  """A Python reward ``fn(prompt: str, completion: str) -> float``, or its dotted name."""
  reward = resolve_callable(fn) if isinstance(fn, str) else fn

  def score(candidates: Sequence[Candidate]) -> np.ndarray:
    out = []
    for c in candidates:
      value = reward(c.prompt, c.completion)
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"reward function {fn!r} returned {value!r}; it must return a float.")
      out.append(float(value))
    return np.asarray(out, np.float64)
  return score


def normalize_answer(text: str) -> str:
  """Lower case, punctuation removed, whitespace collapsed (SQuAD-style normalisation)."""
  text = re.sub(r"[^\w\s]", " ", text.lower())
  return " ".join(text.split())


@register_scorer("exact_match")
def exact_match_scorer(*, field: str = "answer", normalize: bool = True) -> Scorer:
  """1.0 when the completion equals the prompt record's reference answer ``field``, else 0.0.

  Args:
    field: the reference answer's key in each prompt record.
    normalize: compare after :func:`normalize_answer` (else exactly, whitespace stripped).
  """
  norm = normalize_answer if normalize else str.strip

  def score(candidates: Sequence[Candidate]) -> np.ndarray:
    out = []
    for c in candidates:
      if field not in c.example:
        raise ValueError(f"exact_match needs the reference answer field {field!r} in every"
                         f" prompt record; prompt {c.prompt[:40]!r} has {sorted(c.example)}.")
      out.append(float(norm(c.completion) == norm(str(c.example[field]))))
    return np.asarray(out, np.float64)
  return score
