"""Preference batch sources of the recipes: stored pairs, and Distillation-DPO rounds.

- ``data.source = "pairs"`` (:func:`pair_sources`): tokenized pairs from an ``.npz`` file
  (``chosen_tokens``, ``chosen_labels``, ``rejected_tokens``, ``rejected_labels`` ``[N, T]`` and
  optionally the teacher's top-k fields of :func:`jkd.train.preference_step.pair_teacher_targets`,
  which ADPA needs), served by an :class:`jkd.data.ArraySource`; no evaluation set (the
  engine evaluates language-model batches). Text pairs: ``data.source = "preference"``.
- ``data.source = "rounds"`` (:class:`RoundPairsSource`): Distillation-DPO. Every
  ``rounds.steps_per_round`` steps the current student samples ``rounds.n`` completions per
  prompt of ``rounds.prompts``, the teacher ranks them by its mean log-likelihood
  (:func:`jkd.data.preference.make_pairs`, scorer ``teacher_logprob``, ``round_index`` = the
  round), and the round's batches are drawn from those pairs.

The engine (:func:`jkd.train.train`) gives the source the teacher and the student's config once
the teacher is built (:meth:`~jkd.data.BatchSource.bind_models`), and the current student
before each batch (:meth:`~jkd.data.BatchSource.before_batch`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from jkd import models
from jkd.data import corpus
from jkd.data import preference
from jkd.data.arrays import ArraySource, check_token_arrays, read_npz
from jkd.data.source import BatchSource
from jkd.train import config

PyTree = Any
_PAIR_FIELDS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
_METRIC = "metric/rounds/"


# ---------------------------------------------------------------------------------------------
# Stored pairs.

def load_pairs(path: str, *, vocab: int) -> dict[str, np.ndarray]:
  """Tokenized pairs (and any extra per-pair arrays, e.g. a teacher's top-k) from an ``.npz``.

  Args:
    path: the file: ``chosen_tokens``, ``chosen_labels``, ``rejected_tokens``,
      ``rejected_labels`` ``[N, T]`` arrays, optionally the teacher fields of
      :func:`jkd.train.preference_step.pair_teacher_targets` ``[N, T(, k)]``.
    vocab: the model's vocabulary (ids must be below it).

  Returns:
    ``{name: [N, ...] array}``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not an ``.npz``, a missing field, arrays of mismatched shapes, or ids outside
      the vocabulary (the message names the file and the array).
  """
  path = os.path.expanduser(path)
  if not path.endswith(".npz"):
    raise ValueError(f"data.path {path!r}: data.source='pairs' reads an .npz of tokenized pairs;"
                     " for JSONL text pairs use data.source='preference'.")
  arrays = read_npz(path, _PAIR_FIELDS, what="data.source='pairs'")
  chosen = check_token_arrays(arrays, path, vocab=vocab, prefix="chosen_")
  rejected = check_token_arrays(arrays, path, vocab=vocab, prefix="rejected_")
  if chosen != rejected:
    raise ValueError(f"{path}: 'chosen_tokens' has shape {chosen} but 'rejected_tokens' has"
                     f" shape {rejected}; pairs need both sides padded to one [N, T] shape"
                     " (jkd.data.preference.tokenize_pairs).")
  return arrays


def pair_sources(cfg, vocab: int, tokenizer=None) -> tuple[ArraySource, None]:
  """``data.source='pairs'``: ``(ArraySource of data.path's pairs, None)``."""
  del tokenizer
  d = cfg.data
  if not d.path:
    raise ValueError("data.source='pairs' needs data.path: an .npz of tokenized pairs (e.g. with"
                     " the teacher targets of jkd.train.preference_step.pair_teacher_targets).")
  return ArraySource(load_pairs(d.path, vocab=vocab), int(d.batch_size), seed=int(d.seed)), None


# ---------------------------------------------------------------------------------------------
# Distillation-DPO rounds.

class RoundPairsSource(BatchSource):
  """Distillation-DPO's batch source: pairs re-made from the student's samples every round.

  Round ``r`` covers steps ``[r K, (r + 1) K)`` (``K = steps_per_round``). At its first batch
  the source calls :func:`jkd.data.preference.make_pairs` with the student given by the last
  :meth:`before_batch` (``n`` samples per prompt, ``seed``, ``round_index = r``), ranks them with
  the teacher's mean log-likelihood (scorer ``teacher_logprob``), and tokenizes the pairs
  (:func:`jkd.data.preference.tokenize_preference`; pairs that do not fit are dropped). Batch
  ``i`` of the round draws its rows from ``numpy.random.default_rng([seed, r, i])`` (with
  replacement when the round has fewer pairs than a batch). Batches carry
  ``metric/rounds/round`` and ``metric/rounds/pairs`` (logged as ``rounds/...``).

  Resuming: :meth:`get_state` holds the step and, in the middle of a round, the round's pairs
  (text, JSON), so a restored source serves exactly the batches of an uninterrupted run. At a
  round boundary the state holds no pairs: the next round is made lazily at the next
  ``next()`` from the student given after the restore (the checkpointed one), as it would be.

  Args:
    prompts: prompt records (``{"prompt": text, ...}``) or texts.
    tokenizer: the teacher's (and student's) tokenizer.
    seq_len: length of every row.
    batch_size: global pairs per batch (a multiple of the processes).
    steps_per_round: ``K``.
    n, max_new_tokens, temperature, top_p: sampling (:func:`jkd.data.preference.make_pairs`).
    seed: seed of the samples and of the batch draws.
    chat_template: prompts through the tokenizer's chat template.
    generate_batch_size: sequences per sampling call.
  """

  def __init__(self, prompts: Sequence[Any], *, tokenizer, seq_len: int, batch_size: int,
               steps_per_round: int, n: int = 4, max_new_tokens: int = 64,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               chat_template: bool = True, generate_batch_size: int = 8,
               process_index: int | None = None, process_count: int | None = None):
    if not prompts:
      raise ValueError("Distillation-DPO rounds need prompts (rounds.prompts).")
    for name, value in (("steps_per_round", steps_per_round), ("batch_size", batch_size),
                        ("max_new_tokens", max_new_tokens)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"rounds: {name} must be an int >= 1 (got {value!r}).")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
      raise ValueError(f"rounds.n must be an int >= 2 (samples per prompt), got {n!r}.")
    self.prompts = [p if isinstance(p, Mapping) else {"prompt": p} for p in prompts]
    self.tokenizer, self.seq_len = tokenizer, int(seq_len)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if batch_size % self.process_count:
      raise ValueError(f"the global batch size {batch_size} is not divisible by the"
                       f" {self.process_count} processes.")
    self.batch_size, self.steps_per_round = int(batch_size), int(steps_per_round)
    self.sampling = dict(n=int(n), max_new_tokens=int(max_new_tokens),
                         temperature=float(temperature), top_p=float(top_p),
                         batch_size=int(generate_batch_size), chat_template=bool(chat_template))
    self.seed = int(seed)
    self._teacher: tuple[PyTree, models.ModelConfig] | None = None
    self._student_config: models.ModelConfig | None = None
    self._params: PyTree | None = None
    self._step = 0
    self._round: int | None = None
    self._pairs: list[dict[str, Any]] = []
    self._arrays: dict[str, np.ndarray] = {}

  # The engine's hooks. -------------------------------------------------------------------------

  def bind_models(self, *, teacher_params: PyTree, teacher_config: models.ModelConfig,
                 student_config: models.ModelConfig) -> None:
    """The teacher (the scorer) and the student's config (to sample from it)."""
    self._teacher = (teacher_params, teacher_config)
    self._student_config = student_config

  def before_batch(self, params: PyTree) -> None:
    """The student parameters the next round samples from."""
    self._params = params

  # Rounds. -------------------------------------------------------------------------------------

  @property
  def round(self) -> int:
    """The round of the next batch."""
    return self._step // self.steps_per_round

  def make_round(self, round_index: int) -> list[dict[str, Any]]:
    """The pairs of round ``round_index`` from the current student (text, ranked)."""
    if self._teacher is None or self._student_config is None:
      raise ValueError("a Distillation-DPO round needs the teacher: call bind_models(...) first"
                       " (jkd.train.train does).")
    if self._params is None:
      raise ValueError("a Distillation-DPO round samples from the student: call"
                       " before_batch(params) before next() (jkd.train.train does).")
    s = self.sampling
    teacher_params, teacher_config = self._teacher
    pairs = preference.make_pairs(
        self.prompts, policy=(self._params, self._student_config), tokenizer=self.tokenizer,
        scorer="teacher_logprob",
        scorer_options={"params": teacher_params, "config": teacher_config,
                        "batch_size": s["batch_size"]},
        n=s["n"], max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
        top_p=s["top_p"], seed=self.seed, round_index=round_index, batch_size=s["batch_size"],
        chat_template=s["chat_template"])
    return [dict(p) for p in pairs]

  def _use(self, round_index: int, pairs: list[dict[str, Any]]) -> None:
    rows = []
    for p in pairs:
      try:
        row = preference.tokenize_preference(p, self.tokenizer, seq_len=self.seq_len,
                                             chat_template=self.sampling["chat_template"],
                                             overflow="drop")
      except ValueError:  # E.g. identical once truncated: no preference signal.
        row = None
      if row is not None:
        rows.append(row)
    if not rows:
      raise ValueError(f"Distillation-DPO round {round_index} made no usable pair from"
                       f" {len(self.prompts)} prompts (all samples scored equal, were empty, or"
                       f" did not fit data.seq_len={self.seq_len}): raise rounds.n,"
                       " rounds.temperature or data.seq_len, or give more prompts.")
    self._round, self._pairs = round_index, pairs
    self._arrays = {k: np.stack([r[k] for r in rows]) for k in _PAIR_FIELDS}

  def _batch(self, round_index: int, i: int) -> dict[str, np.ndarray]:
    count = len(self._arrays["chosen_tokens"])
    rng = np.random.default_rng([self.seed, round_index, i])
    rows = rng.choice(count, size=self.batch_size, replace=count < self.batch_size)
    local = self.batch_size // self.process_count
    rows = rows[self.process_index * local:(self.process_index + 1) * local]
    batch = {k: v[rows] for k, v in self._arrays.items()}
    batch[_METRIC + "round"] = np.full(local, round_index, np.float32)
    batch[_METRIC + "pairs"] = np.full(local, count, np.float32)
    return batch

  def __next__(self) -> dict[str, np.ndarray]:
    r = self.round
    if self._round != r:
      self._use(r, self.make_round(r))
    batch = self._batch(r, self._step % self.steps_per_round)
    self._step += 1
    return batch

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """The current round's batches (none before the first round is made)."""
    if self._round is not None:
      for i in range(self.steps_per_round):
        yield self._batch(self._round, i)

  def get_state(self) -> dict[str, Any]:
    """The step and, in the middle of a round, the round's pairs (JSON)."""
    mid = self._round is not None and self._round == self.round and (
        self._step % self.steps_per_round)
    return {"step": self._step, "seed": self.seed, "steps_per_round": self.steps_per_round,
            "round": self._round if mid else None, "pairs": self._pairs if mid else None}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes after :meth:`get_state` (the same seed and ``steps_per_round``)."""
    for key in ("seed", "steps_per_round"):
      if key not in state or int(state[key]) != getattr(self, key):
        raise ValueError(f"the checkpoint's data state has {key}={state.get(key)!r} but this"
                         f" run {getattr(self, key)}: resume with the same rounds settings and"
                         " seed, or start a new workdir.")
    self._step = int(state["step"])
    self._round, self._pairs, self._arrays = None, [], {}
    if state.get("pairs") is not None:
      self._use(int(state["round"]), list(state["pairs"]))


def round_sources(cfg, vocab: int, tokenizer) -> tuple[RoundPairsSource, None]:
  """``data.source='rounds'``: ``(RoundPairsSource of the rounds.* settings, None)``."""
  del vocab
  r = config.section(cfg, "rounds", needed_by="data.source='rounds'")
  path = os.path.expanduser(r.prompts) if r.prompts else corpus.SHIPPED_PROMPTS
  prompts = corpus.read_prompts(path)
  if int(r.limit) > 0:
    prompts = prompts[:int(r.limit)]
  source = RoundPairsSource(
      prompts, tokenizer=tokenizer, seq_len=int(cfg.data.seq_len),
      batch_size=int(cfg.data.batch_size), steps_per_round=int(r.steps_per_round), n=int(r.n),
      max_new_tokens=int(r.max_new_tokens), temperature=float(r.temperature),
      top_p=float(r.top_p), seed=int(cfg.data.seed), chat_template=bool(cfg.data.chat_template),
      generate_batch_size=int(r.generate_batch_size))
  return source, None
