"""The engine's batch sources, one module per kind, registered here in one table.

``data.source`` names an entry of :data:`DATA_SOURCES`. An entry either makes its sources from
the config (``make(cfg, vocab, tokenizer) -> (train, eval or None)``), or prepares them in the
run's workdir with the teacher (``prepare``: the teacher-written corpus of the main job, which
:func:`jkd.train.stages.run` writes before training). ``tokenizer`` says when the teacher's
tokenizer is needed: ``"always"``, ``"text"`` (unless ``data.shape='tokenized'``) or never.

Wrappers applied after the data source: ``data.select`` (:mod:`.miniplm`) and
``onpolicy.mode`` (:mod:`.onpolicy`). Every source is a :class:`jkd.data.BatchSource`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from jkd.train import build
from jkd.train.sources import arte
from jkd.train.sources import corpus
from jkd.train.sources import ddk
from jkd.train.sources import in_memory
from jkd.train.sources import miniplm
from jkd.train.sources import onpolicy
from jkd.train.sources import pairs
from jkd.train.sources import rounds
from jkd.train.sources import qcrd as qcrd_source
from jkd.train.sources import self_imitation
from jkd.train.sources import text


class DataSource(NamedTuple):
  """An entry of :data:`DATA_SOURCES`.

  Attributes:
    make: ``(cfg, vocab, tokenizer) -> (train source, eval source or None)``, or None for a
      source that is prepared in the workdir (``prepare``).
    tokenizer: when ``make`` needs the teacher's tokenizer: ``"always"``, ``"text"``
      (:func:`jkd.train.sources.text.is_text`), ``""`` (never), or a ``cfg -> bool``.
    prepare: ``(cfg, workdir, teacher, tokenizer) -> corpus.Prepared``, run by
      :func:`jkd.train.stages.run` before training.
  """
  make: Callable[..., tuple[Any, Any]] | None
  tokenizer: str | Callable[[Any], bool] = ""
  prepare: Callable[..., Any] | None = None


#: ``data.source`` -> how its batch sources are made.
DATA_SOURCES: dict[str, DataSource] = {
    "synthetic": DataSource(in_memory.synthetic_sources),
    "npz": DataSource(in_memory.npz_sources),
    "jsonl": DataSource(text.jsonl_sources, tokenizer="text"),
    "tfds": DataSource(text.tfds_sources, tokenizer="text"),
    "preference": DataSource(pairs.preference_sources, tokenizer="always"),
    "synthetic_pairs": DataSource(pairs.synthetic_pair_sources),
    "step_pairs": DataSource(pairs.step_pair_sources, tokenizer="always"),
    "ranked": DataSource(pairs.ranked_sources, tokenizer="always"),
    "synthetic_ranked": DataSource(pairs.synthetic_ranked_sources),
    "pairs": DataSource(rounds.pair_sources),
    "rounds": DataSource(rounds.round_sources, tokenizer="always"),
    "domains": DataSource(ddk.domain_sources, tokenizer=lambda cfg: bool(ddk.uses_text(cfg))),
    "teacher_corpus": DataSource(None, prepare=corpus.prepare_corpus),
    "arte_corpus": DataSource(None, prepare=arte.prepare_arte),
    "self_imitation": DataSource(self_imitation.self_imitation_sources, tokenizer="always"),
    "qcrd": DataSource(qcrd_source.qcrd_sources, tokenizer="always"),
}


def data_source(cfg) -> DataSource:
  """The entry of ``data.source``.

  Raises:
    ValueError: an unknown source, naming the registered ones.
  """
  if cfg.data.source not in DATA_SOURCES:
    raise ValueError(f"unknown data.source {cfg.data.source!r}; choose one of"
                     f" {sorted(DATA_SOURCES)}.")
  return DATA_SOURCES[cfg.data.source]


def needs_tokenizer(cfg) -> bool:
  """Whether ``data.source`` needs the teacher's tokenizer to make its sources."""
  rule = data_source(cfg).tokenizer
  if callable(rule):
    return bool(rule(cfg))
  return rule == "always" or (rule == "text" and text.is_text(cfg))


def make_sources(cfg, vocab: int, tokenizer=None) -> tuple[Any, Any]:
  """The train source (shuffled) and the eval source (in order, or None) of ``data.source``.

  Args:
    cfg: the training config (its ``data`` and, for text data, ``teacher`` sections).
    vocab: the model's vocabulary size (token ids must be below it).
    tokenizer: the teacher's tokenizer; None: found from the config
      (:func:`jkd.train.build.tokenizer_for`) when the source needs one.

  Returns:
    ``(train, eval or None)``.
  """
  entry = data_source(cfg)
  if entry.make is None:
    raise ValueError(f"data.source={cfg.data.source!r} is prepared in the workdir with the"
                     " teacher before training: run `python -m jkd.train` (or"
                     " jkd.train.stages.run(cfg, workdir)) rather than jkd.train.train().")
  if tokenizer is None and needs_tokenizer(cfg):
    tokenizer = build.tokenizer_for(cfg)
  return entry.make(cfg, vocab, tokenizer)
