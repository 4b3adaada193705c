"""QCRD's batch source: teacher rationales as positives, the student's own as negatives.

``data.source = "qcrd"`` (docs/methods.md §17). Once, the teacher samples
``qcrd.positives`` rationales per prompt at ``qcrd.teacher_temperature``; self-consistency keeps
those whose answer (the last match of ``qcrd.answer_pattern``) is the majority answer of the
prompt's samples (:func:`jkd.data.critics.self_consistent`; ``""``: every non-empty sample).
Every round (``qcrd.steps_per_round`` steps) the current student, the previous round's model,
samples ``qcrd.negatives`` rationales per prompt at the high ``qcrd.negative_temperature``:
QCRD's self-adversarial negatives. Each prompt's positives and negatives are paired in turn
(``max(#positives, #negatives)`` pairs, each side cycled; a negative equal to a positive is
dropped), and the round's batches are those pairs as preference batches (chosen = positive,
rejected = negative) for the ``qcrd`` loss term (:mod:`jkd.losses.qcrd`). Every batch logs
``qcrd_data/round``, ``rows`` (the round's pairs), ``positive_rate`` (positives kept / teacher
samples) and ``negative_rate`` (usable negatives / student samples).

Reference: Wang et al., *QCRD: Quality-guided Contrastive Rationale Distillation for Large
Language Models*, arXiv:2405.13014, 2024.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from jkd.data import corpus
from jkd.data import critics
from jkd.data import preference
from jkd.train import config
from jkd.train.sources import round_data

_PAIR_FIELDS = preference.TOKEN_FIELDS
#: Sampling streams (:func:`jkd.data.critics.sample`): the teacher's positives, the negatives.
POSITIVE_STREAM, NEGATIVE_STREAM = 1, 0


def pair_up(positives: Sequence[str], negatives: Sequence[str]) -> list[tuple[str, str]]:
  """One prompt's ``(positive, negative)`` pairs: ``max(P, N)`` of them, pair ``j`` the
  positive ``j mod P`` and the negative ``j mod N``; negatives equal to a positive are dropped
  first (no contrast). None when either side is empty.

  >>> pair_up(["a", "b"], ["x", "a", "y", "z"])
  [('a', 'x'), ('b', 'y'), ('a', 'z')]
  """
  negatives = [n for n in negatives if n not in set(positives)]
  if not positives or not negatives:
    return []
  size = max(len(positives), len(negatives))
  return [(positives[j % len(positives)], negatives[j % len(negatives)]) for j in range(size)]


class QCRDSource(round_data.RoundSource):
  """Pairs (teacher rationale, student rationale), remade every round (module docstring).

  Args:
    prompts: prompt records (``{"prompt": text, ...}``) or texts.
    tokenizer: the teacher's (and student's) tokenizer.
    seq_len, batch_size, steps_per_round, seed, chat_template, generate_batch_size: see
      :class:`jkd.train.sources.round_data.RoundSource`.
    positives: teacher samples per prompt (before self-consistency).
    negatives: student samples per prompt and round.
    teacher_temperature, negative_temperature: their sampling temperatures.
    max_new_tokens, top_p: sampling.
    answer_pattern: the regex of an answer for self-consistency (``""``: none).
  """

  prefix = "qcrd_data"
  what = "QCRD"

  def __init__(self, prompts: Sequence[Any], *, tokenizer, seq_len: int, batch_size: int,
               steps_per_round: int, positives: int = 4, negatives: int = 2,
               teacher_temperature: float = 0.7, negative_temperature: float = 1.5,
               max_new_tokens: int = 64, top_p: float = 1.0, answer_pattern: str = "",
               seed: int = 0, chat_template: bool = True, generate_batch_size: int = 8,
               process_index: int | None = None, process_count: int | None = None):
    super().__init__(prompts, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                     steps_per_round=steps_per_round, seed=seed, chat_template=chat_template,
                     generate_batch_size=generate_batch_size, process_index=process_index,
                     process_count=process_count)
    self.positives = round_data.check_int("qcrd.positives", positives)
    self.negatives = round_data.check_int("qcrd.negatives", negatives)
    self.max_new_tokens = round_data.check_int("qcrd.max_new_tokens", max_new_tokens)
    for name, t in (("teacher_temperature", teacher_temperature),
                    ("negative_temperature", negative_temperature)):
      if not float(t) > 0:
        raise ValueError(f"qcrd.{name} must be > 0 (got {t!r}).")
    self.teacher_temperature = float(teacher_temperature)
    self.negative_temperature = float(negative_temperature)
    self.top_p = float(top_p)
    critics.self_consistent([], answer_pattern)  # A bad regex fails here.
    self.answer_pattern = str(answer_pattern)
    self._positive_texts: list[list[str]] | None = None
    self._positive_rate = 0.0

  def _sample(self, model, n: int, temperature: float, round_index: int, stream: int):
    cands = critics.sample(self.prompts, model=model, tokenizer=self.tokenizer, n=n,
                           max_new_tokens=self.max_new_tokens, temperature=temperature,
                           top_p=self.top_p, seed=self.seed, round_index=round_index,
                           stream=stream, batch_size=self.generate_batch_size,
                           chat_template=self.chat_template)
    return [[c.completion for c in cands[i * n:(i + 1) * n]] for i in range(len(self.prompts))]

  def positive_texts(self) -> list[list[str]]:
    """Each prompt's positives: the teacher's self-consistent samples (made once, distinct)."""
    if self._positive_texts is None:
      samples = self._sample(self.teacher(), self.positives, self.teacher_temperature, 0,
                             POSITIVE_STREAM)
      kept = []
      for texts in samples:
        keep = critics.self_consistent(texts, self.answer_pattern)
        kept.append(list(dict.fromkeys(t for t, k in zip(texts, keep) if k)))
      self._positive_texts = kept
      self._positive_rate = sum(len(k) for k in kept) / (self.positives * len(self.prompts))
    return self._positive_texts

  def make_round(self, round_index: int) -> dict[str, Any]:
    """The round's pairs: the cached positives against the current student's fresh samples."""
    positives = self.positive_texts()
    negatives = self._sample(self.student(), self.negatives, self.negative_temperature,
                             round_index, NEGATIVE_STREAM)
    records, usable = [], 0
    for record, pos, neg in zip(self.prompts, positives, negatives):
      neg = [t for t in neg if t.strip()]
      usable += sum(t not in set(pos) for t in neg)
      records += [{"prompt": record["prompt"], "chosen": p, "rejected": n}
                  for p, n in pair_up(pos, neg)]
    stats = {"positive_rate": self._positive_rate,
             "negative_rate": usable / (self.negatives * len(self.prompts))}
    return {"records": records, "stats": stats}

  def rows(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    rows = []
    for r in records:
      try:
        row = preference.tokenize_preference(r, self.tokenizer, seq_len=self.seq_len,
                                             chat_template=self.chat_template,
                                             overflow="truncate")
      except ValueError:  # Identical once truncated, or a prompt that leaves no room.
        row = None
      if row is not None:
        rows.append(row)
    if not rows:
      return {}
    return {k: np.stack([r[k] for r in rows]) for k in _PAIR_FIELDS}

  def empty_message(self, round_index: int, made: Mapping[str, Any]) -> str:
    s = {k: round(v, 4) for k, v in made.get("stats", {}).items()}
    return (f"QCRD round {round_index} made no usable (positive, negative) pair from"
            f" {len(self.prompts)} prompts ({s}): with positive_rate 0 the teacher's samples"
            " were empty or never matched qcrd.answer_pattern; with negative_rate 0 the"
            " student's were empty or equal to the positives. Raise qcrd.positives,"
            " qcrd.negatives, max_new_tokens or data.seq_len, or give more prompts.")


def qcrd_sources(cfg, vocab: int, tokenizer) -> tuple[QCRDSource, None]:
  """``data.source='qcrd'``: ``(QCRDSource of the qcrd.* settings, None)``."""
  del vocab
  q = config.section(cfg, "qcrd", needed_by="data.source='qcrd'")
  path = os.path.expanduser(q.prompts) if q.prompts else corpus.SHIPPED_PROMPTS
  prompts = corpus.read_prompts(path, keep=True)
  if int(q.limit) > 0:
    prompts = prompts[:int(q.limit)]
  source = QCRDSource(
      prompts, tokenizer=tokenizer, seq_len=int(cfg.data.seq_len),
      batch_size=int(cfg.data.batch_size), steps_per_round=int(q.steps_per_round),
      positives=int(q.positives), negatives=int(q.negatives),
      teacher_temperature=float(q.teacher_temperature),
      negative_temperature=float(q.negative_temperature), max_new_tokens=int(q.max_new_tokens),
      top_p=float(q.top_p), answer_pattern=str(q.answer_pattern), seed=int(cfg.data.seed),
      chat_template=bool(cfg.data.chat_template), generate_batch_size=int(q.generate_batch_size))
  return source, None
