"""What a run on a transformed teacher cache reports: FIRST's calibration, Swing's privacy cost.

A teacher cache written with ``--calibrate`` (FIRST) or ``--privacy_epsilon`` (Swing) records
the transform in its metadata (:mod:`jkd.data.cache_targets`). :func:`with_cache_facts` prints
it when the run starts and wraps the training source so that every batch carries the numbers
as ``metric/<name>`` fields, which the step logs as ``targets/temperature``,
``targets/teacher_ece``, ``targets/renormalized_ece``, ``targets/calibrated_ece``,
``targets/topk_coverage``, ``privacy/epsilon``, ``privacy/delta``, ``privacy/sigma``,
``privacy/clip``, ``privacy/epsilon_position`` and ``privacy/epsilon_sequence`` (constant
over the run) into ``metrics.jsonl``, TensorBoard and the run's report.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

import jax
import numpy as np

from jkd.data import cache_targets
from jkd.data import store
from jkd.data.source import BatchSource

#: Prefix of the batch fields the step logs (``jkd.train.step.METRIC_PREFIX``).
METRIC_PREFIX = "metric/"


class FactsSource(BatchSource):
  """``inner``'s batches with ``metric/<name>`` ``[rows]`` float32 fields of constant ``facts``
  added; every hook and the position are ``inner``'s."""

  def __init__(self, inner: BatchSource, facts: Mapping[str, float]):
    self.inner = inner
    self.facts = dict(facts)

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self.inner))
    rows = np.shape(batch["tokens"])[0]
    for name, value in self.facts.items():
      batch[METRIC_PREFIX + name] = np.full((rows,), value, np.float32)
    return batch

  def get_state(self) -> Any:
    return self.inner.get_state()

  def set_state(self, state: Any) -> None:
    self.inner.set_state(state)

  def one_epoch(self):
    return self.inner.one_epoch()

  def bind_models(self, **kwargs) -> None:
    self.inner.bind_models(**kwargs)

  def before_batch(self, params) -> None:
    self.inner.before_batch(params)

  def after_eval(self, metrics, params) -> None:
    self.inner.after_eval(metrics, params)


def with_cache_facts(source: BatchSource, path: str) -> BatchSource:
  """``source`` wrapped in a :class:`FactsSource` when the dataset at ``path`` is a teacher cache
  with FIRST or Swing targets (their lines printed once, on process 0); else ``source``."""
  meta = store.read_metadata(path)
  if meta.get("kind") != "teacher_cache":
    return source
  facts = cache_targets.facts(meta)
  if not facts:
    return source
  if jax.process_index() == 0:
    for line in cache_targets.facts_lines(meta):
      print(f"teacher cache {path}: {line}", file=sys.stderr, flush=True)
  return FactsSource(source, facts)
