"""MiniPLM difference sampling in the engine: ``data.select = "miniplm"``.

Before the first batch, every training example is scored by ``avg log p_teacher - avg log
p_reference`` with the small reference model ``data.select_reference`` (a
:func:`jkd.data.model_spec.load_model` spec: ``smollm2``, ``gguf:PATH``, ``hf:DIR`` or
``random:{json}``; same tokenizer as the teacher), and the top ``data.select_fraction`` are kept
(:func:`jkd.data.miniplm_select`). Limits: the examples must be in memory (``data.source``
``synthetic`` or ``npz``: a :class:`~jkd.data.ArraySource`); the scores are recomputed,
identically, when a run resumes (no cache). The source gets the teacher through
:meth:`~jkd.data.BatchSource.bind_models` once the engine has built it.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from jkd import models
from jkd.data import selection
from jkd.data import model_spec
from jkd.data.arrays import ArraySource
from jkd.data.source import BatchSource

PyTree = Any


class SelectedSource(BatchSource):
  """An :class:`ArraySource` of the examples MiniPLM keeps (chosen once the teacher is given).

  Args:
    source: the ArraySource of all training examples.
    reference: ``(params, config)`` of the small reference model, or a
      :func:`jkd.data.model_spec.load_model` spec string (loaded when needed).
    fraction: share kept (0.5).
    batch_size: documents per scoring forward pass.
  """

  def __init__(self, source: ArraySource, *, reference, fraction: float = 0.5,
               batch_size: int = 8):
    if not isinstance(source, ArraySource):
      raise ValueError(f"data.select='miniplm' scores in-memory examples (data.source"
                       f" 'synthetic' or 'npz'); this data is a {type(source).__name__}.")
    if not reference:
      raise ValueError("data.select='miniplm' needs data.select_reference: the small reference"
                       " model ('smollm2', 'gguf:PATH', 'hf:DIR' or 'random:{json}').")
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
      raise ValueError(f"data.select_fraction must be in (0, 1] (got {fraction!r}).")
    self.all, self.reference, self.fraction = source, reference, float(fraction)
    self.score_batch_size = int(batch_size)
    self.selection = None
    self._source: ArraySource | None = None

  def bind_models(self, *, teacher_params: PyTree, teacher_config: models.ModelConfig,
                 student_config: models.ModelConfig) -> None:
    """Scores the examples with the teacher and the reference, and keeps the top fraction."""
    del student_config
    reference = self.reference
    if isinstance(reference, str):
      loaded = model_spec.load_model(reference)
      reference = (loaded.params, loaded.config)
    if reference[1].vocab_size != teacher_config.vocab_size:
      raise ValueError(f"data.select_reference has vocabulary {reference[1].vocab_size}, the"
                       f" teacher {teacher_config.vocab_size}: MiniPLM compares models of one"
                       " tokenizer.")
    self.selection = selection.miniplm_select(
        self.all.examples, teacher=(teacher_params, teacher_config), reference=reference,
        fraction=self.fraction, batch_size=self.score_batch_size)
    kept = len(self.selection.indices)
    if kept < self.all.batch_size:
      raise ValueError(f"MiniPLM kept {kept} examples, fewer than a batch"
                       f" ({self.all.batch_size}): raise data.select_fraction or the data.")
    self._source = ArraySource(self.selection.examples, self.all.batch_size, self.all.seed,
                               process_index=self.all.process_index,
                               process_count=self.all.process_count)

  def _kept(self) -> ArraySource:
    if self._source is None:
      raise ValueError("MiniPLM selection needs the teacher: call bind_models(...) first"
                       " (jkd.train.train does).")
    return self._source

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._kept())

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    return self._kept().one_epoch()

  def get_state(self) -> dict[str, Any]:
    return self._kept().get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._kept().set_state(state)


def select_source(cfg, source):
  """The train source with ``data.select`` applied (``""``: as it is; ``miniplm``)."""
  mode = cfg.data.get("select", "")
  if not mode:
    return source
  if mode != "miniplm":
    raise ValueError(f"unknown data.select {mode!r}; use '' (all examples) or 'miniplm'.")
  return SelectedSource(source, reference=cfg.data.select_reference,
                        fraction=float(cfg.data.select_fraction))
