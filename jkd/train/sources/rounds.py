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
from typing import Any, Mapping, Sequence

import numpy as np

from jkd.data import corpus
from jkd.data import preference
from jkd.data.arrays import ArraySource, check_token_arrays, read_npz
from jkd.train import config
from jkd.train.sources import round_data

_PAIR_FIELDS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")


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

class RoundPairsSource(round_data.RoundSource):
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

  The round mechanics are :class:`jkd.train.sources.round_data.RoundSource`'s; the state keeps
  its own form (the round's pairs under ``"pairs"``, not ``"made"``).

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

  prefix = "rounds"
  what = "Distillation-DPO"
  rows_metric = "pairs"
  settings_name = "rounds"

  def __init__(self, prompts: Sequence[Any], *, tokenizer, seq_len: int, batch_size: int,
               steps_per_round: int, n: int = 4, max_new_tokens: int = 64,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               chat_template: bool = True, generate_batch_size: int = 8,
               process_index: int | None = None, process_count: int | None = None):
    if not prompts:
      raise ValueError("Distillation-DPO rounds need prompts (rounds.prompts).")
    for name, value in (("steps_per_round", steps_per_round), ("batch_size", batch_size),
                        ("max_new_tokens", max_new_tokens)):
      round_data.check_int(f"rounds: {name}", value)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
      raise ValueError(f"rounds.n must be an int >= 2 (samples per prompt), got {n!r}.")
    super().__init__(prompts, tokenizer=tokenizer, seq_len=int(seq_len), batch_size=batch_size,
                     steps_per_round=steps_per_round, seed=seed, chat_template=chat_template,
                     generate_batch_size=int(generate_batch_size),
                     process_index=process_index, process_count=process_count)
    self.sampling = dict(n=int(n), max_new_tokens=int(max_new_tokens),
                         temperature=float(temperature), top_p=float(top_p),
                         batch_size=self.generate_batch_size, chat_template=self.chat_template)

  # Rounds. -------------------------------------------------------------------------------------

  def make_round(self, round_index: int) -> list[dict[str, Any]]:
    """The pairs of round ``round_index`` from the current student (text, ranked)."""
    teacher_params, teacher_config = self.teacher()
    policy = self.student()
    s = self.sampling
    pairs = preference.make_pairs(
        self.prompts, policy=policy, tokenizer=self.tokenizer, scorer="teacher_logprob",
        scorer_options={"params": teacher_params, "config": teacher_config,
                        "batch_size": s["batch_size"]},
        n=s["n"], max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
        top_p=s["top_p"], seed=self.seed, round_index=round_index, batch_size=s["batch_size"],
        chat_template=s["chat_template"])
    return [dict(p) for p in pairs]

  def _make(self, round_index: int) -> dict[str, Any]:
    return {"records": self.make_round(round_index)}

  def rows(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The tokenized pairs (``_PAIR_FIELDS``; pairs that do not fit are dropped)."""
    rows = []
    for p in records:
      try:
        row = preference.tokenize_preference(p, self.tokenizer, seq_len=self.seq_len,
                                             chat_template=self.chat_template, overflow="drop")
      except ValueError:  # E.g. identical once truncated: no preference signal.
        row = None
      if row is not None:
        rows.append(row)
    if not rows:
      return {}
    return {k: np.stack([r[k] for r in rows]) for k in _PAIR_FIELDS}

  def empty_message(self, round_index: int, made: Mapping[str, Any]) -> str:
    del made
    return (f"Distillation-DPO round {round_index} made no usable pair from"
            f" {len(self.prompts)} prompts (all samples scored equal, were empty, or"
            f" did not fit data.seq_len={self.seq_len}): raise rounds.n,"
            " rounds.temperature or data.seq_len, or give more prompts.")

  @property
  def _pairs(self) -> list[dict[str, Any]]:
    """The pairs of the round in use (text; empty before the first)."""
    return self._made.get("records", [])

  def get_state(self) -> dict[str, Any]:
    """The step and, in the middle of a round, the round's pairs (JSON)."""
    state = super().get_state()
    made = state.pop("made")
    state["pairs"] = None if made is None else made["records"]
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes after :meth:`get_state` (the same seed and ``steps_per_round``)."""
    state = dict(state)
    pairs = state.pop("pairs", None)
    state["made"] = None if pairs is None else {"records": list(pairs)}
    super().set_state(state)


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
