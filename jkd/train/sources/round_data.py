"""The shared mechanics of batch sources whose data is generated anew every round.

A round ``r`` covers steps ``[r K, (r + 1) K)`` (``K = steps_per_round``). At its first batch
the source makes the round's data (:meth:`RoundSource.make_round`: text records and per-round
statistics, JSON) from the models the engine gave it (:meth:`~jkd.data.BatchSource.bind_models`:
the teacher; :meth:`~jkd.data.BatchSource.before_batch`: the current student), tokenizes it
(:meth:`RoundSource.rows`), and batch ``i`` of the round draws its rows from
``numpy.random.default_rng([seed, r, i])`` (with replacement when the round has fewer rows than
a batch). Every batch carries the round's statistics as ``metric/<prefix>/<name>`` fields (the
step logs them as ``<prefix>/<name>``), with ``round`` and ``rows`` (the round's row count; the
name is :attr:`RoundSource.rows_metric`).

Resuming: :meth:`RoundSource.get_state` holds the step and, in the middle of a round, the
round's data, so a restored source serves exactly the batches of an uninterrupted run; at a
round boundary the next round is made lazily from the student given after the restore.

Used by :mod:`jkd.train.sources.self_imitation`, :mod:`jkd.train.sources.qcrd` and
:mod:`jkd.train.sources.rounds` (Distillation-DPO).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from jkd import models
from jkd.data.corpus import encode_prompt
from jkd.data.scoring import sequence_layout
from jkd.data.source import BatchSource

PyTree = Any


def check_int(name: str, value: Any, low: int = 1) -> int:
  """``value`` as an int ``>= low``, else a ``ValueError`` naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low} (got {value!r}).")
  return int(value)


def lm_row(tokenizer, prompt: str, completion: str, *, seq_len: int, chat_template: bool
           ) -> dict[str, np.ndarray] | None:
  """``prompt + completion + [EOS]`` as a language-model row: ``tokens`` and ``labels``
  ``[seq_len]`` int32, labels on the completion only (:func:`jkd.data.scoring.sequence_layout`).
  A completion longer than the room left by the prompt is cut (its EOS may be cut); a prompt
  that leaves no room gives None."""
  eos = int(tokenizer.eos_token_id)
  pad = tokenizer.pad_token_id
  pad = eos if pad is None else int(pad)
  p = encode_prompt(tokenizer, prompt, chat_template=chat_template)
  room = seq_len - len(p)
  if room < 1:
    return None
  c = [int(i) for i in tokenizer(completion, add_special_tokens=False)["input_ids"]] + [eos]
  tokens, labels = sequence_layout(p, c[:room], seq_len, pad)
  return {"tokens": tokens, "labels": labels}


class RoundSource(BatchSource):
  """Base class: data made anew every ``steps_per_round`` steps (see the module docstring).

  Subclasses define :meth:`make_round` (``round index -> {"records": [...], "stats": {...}}``,
  JSON), :meth:`rows` (records -> ``{name: [N, T] array}``), :attr:`prefix` (of the metrics)
  and :attr:`what` (the method's name in messages).
  """

  prefix = "rounds"
  what = "round source"
  #: The metric of the round's row count (``metric/<prefix>/<rows_metric>``).
  rows_metric = "rows"
  #: The settings a resume error names (None: :attr:`what`'s).
  settings_name: str | None = None

  def __init__(self, prompts: Sequence[Any], *, tokenizer, seq_len: int, batch_size: int,
               steps_per_round: int, seed: int = 0, chat_template: bool = True,
               generate_batch_size: int = 8, process_index: int | None = None,
               process_count: int | None = None):
    if not prompts:
      raise ValueError(f"{self.what} needs prompts.")
    self.steps_per_round = check_int("steps_per_round", steps_per_round)
    self.batch_size = check_int("batch_size", batch_size)
    self.generate_batch_size = check_int("generate_batch_size", generate_batch_size)
    self.seq_len = check_int("seq_len", seq_len, 2)
    self.prompts = [dict(p) if isinstance(p, Mapping) else {"prompt": p} for p in prompts]
    self.tokenizer, self.chat_template, self.seed = tokenizer, bool(chat_template), int(seed)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if self.batch_size % self.process_count:
      raise ValueError(f"the global batch size {batch_size} is not divisible by the"
                       f" {self.process_count} processes.")
    self._teacher: tuple[PyTree, models.ModelConfig] | None = None
    self._student_config: models.ModelConfig | None = None
    self._params: PyTree | None = None
    self._step = 0
    self._round: int | None = None
    self._made: dict[str, Any] = {}
    self._arrays: dict[str, np.ndarray] = {}

  # The engine's hooks. -------------------------------------------------------------------------

  def bind_models(self, *, teacher_params: PyTree, teacher_config: models.ModelConfig,
                  student_config: models.ModelConfig) -> None:
    """The teacher and the student's config."""
    self._teacher = (teacher_params, teacher_config)
    self._student_config = student_config

  def before_batch(self, params: PyTree) -> None:
    """The student parameters the next round samples from."""
    self._params = params

  def teacher(self) -> tuple[PyTree, models.ModelConfig]:
    """``(params, config)`` of the teacher (after :meth:`bind_models`)."""
    if self._teacher is None:
      raise ValueError(f"a {self.what} round needs the teacher: call bind_models(...) first"
                       " (jkd.train.train does).")
    return self._teacher

  def student(self) -> tuple[PyTree, models.ModelConfig]:
    """``(params, config)`` of the current student (after :meth:`before_batch`)."""
    if self._student_config is None:
      raise ValueError(f"a {self.what} round needs the models: call bind_models(...) first"
                       " (jkd.train.train does).")
    if self._params is None:
      raise ValueError(f"a {self.what} round samples from the student: call"
                       " before_batch(params) before next() (jkd.train.train does).")
    return self._params, self._student_config

  # What a subclass defines. --------------------------------------------------------------------

  def make_round(self, round_index: int) -> dict[str, Any]:
    """``{"records": [...], "stats": {name: float}}`` of round ``round_index`` (JSON)."""
    raise NotImplementedError

  def rows(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """The tokenized rows of the records, ``{name: [N, T] array}`` (``N`` may be 0)."""
    raise NotImplementedError

  def _make(self, round_index: int) -> Mapping[str, Any]:
    """Round ``round_index``'s ``{"records", "stats"}``: :meth:`make_round` (a subclass whose
    :meth:`make_round` gives another form converts it here)."""
    return self.make_round(round_index)

  def empty_message(self, round_index: int, made: Mapping[str, Any]) -> str:
    """The error of a round without a usable row (``made``: what :meth:`make_round` gave)."""
    del made
    return (f"{self.what} round {round_index} made no usable training row from"
            f" {len(self.prompts)} prompts: give more prompts, sample more, or raise"
            f" data.seq_len={self.seq_len}.")

  # Rounds. -------------------------------------------------------------------------------------

  @property
  def round(self) -> int:
    """The round of the next batch."""
    return self._step // self.steps_per_round

  @property
  def stats(self) -> dict[str, float]:
    """The statistics of the round in use (empty before the first)."""
    return dict(self._made.get("stats", {}))

  def _use(self, round_index: int, made: Mapping[str, Any]) -> None:
    arrays = self.rows(made["records"])
    if not arrays or not len(next(iter(arrays.values()))):
      raise ValueError(self.empty_message(round_index, made))
    self._round, self._made, self._arrays = round_index, dict(made), arrays

  def _batch(self, round_index: int, i: int) -> dict[str, np.ndarray]:
    count = len(next(iter(self._arrays.values())))
    rng = np.random.default_rng([self.seed, round_index, i])
    rows = rng.choice(count, size=self.batch_size, replace=count < self.batch_size)
    local = self.batch_size // self.process_count
    rows = rows[self.process_index * local:(self.process_index + 1) * local]
    batch = {k: v[rows] for k, v in self._arrays.items()}
    metric = f"metric/{self.prefix}/"
    batch[metric + "round"] = np.full(local, round_index, np.float32)
    batch[metric + self.rows_metric] = np.full(local, count, np.float32)
    for name, value in self._made.get("stats", {}).items():
      batch[metric + name] = np.full(local, value, np.float32)
    return batch

  def __next__(self) -> dict[str, np.ndarray]:
    r = self.round
    if self._round != r:
      self._use(r, self._make(r))
    batch = self._batch(r, self._step % self.steps_per_round)
    self._step += 1
    return batch

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """The current round's batches (none before the first round is made)."""
    if self._round is not None:
      for i in range(self.steps_per_round):
        yield self._batch(self._round, i)

  def get_state(self) -> dict[str, Any]:
    """The step and, in the middle of a round, the round's data (JSON)."""
    mid = self._round is not None and self._round == self.round and bool(
        self._step % self.steps_per_round)
    return {"step": self._step, "seed": self.seed, "steps_per_round": self.steps_per_round,
            "round": self._round if mid else None, "made": self._made if mid else None}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes after :meth:`get_state` (the same seed and ``steps_per_round``)."""
    for key in ("seed", "steps_per_round"):
      if key not in state or int(state[key]) != getattr(self, key):
        raise ValueError(f"the checkpoint's data state has {key}={state.get(key)!r} but this"
                         f" run {getattr(self, key)}: resume with the same"
                         f" {self.settings_name or self.what} settings and seed, or start a new"
                         " workdir.")
    self._step = int(state["step"])
    self._round, self._made, self._arrays = None, {}, {}
    if state.get("made") is not None:
      self._use(int(state["round"]), state["made"])
