"""DDK in the engine: ``data.source = "domains"``, a domain mixture reweighted during training.

One batch source per domain, mixed by :class:`jkd.data.DomainMixture` with
:class:`jkd.data.DomainWeights`; after every evaluation the engine calls
:meth:`DDKSource.after_eval`, which computes the student's and the teacher's token-mean NLL on
each domain's eval examples (:func:`jkd.data.mean_token_nll`) and updates the weights (the
smoothed student-teacher gap). The weights are part of the data state (checkpointed); batches
carry ``metric/ddk/weight/<domain>`` (logged as ``ddk/weight/<domain>``). Domains:
``ddk.num_domains`` synthetic bigram chains (one seed each), or ``ddk.path`` JSONL files whose
lines carry a ``domain`` field (each domain built into its own cached TFDS dataset,
:mod:`jkd.data.jsonl`, and served by a :class:`jkd.data.DataPipeline`; ``ddk.eval_fraction`` of
each domain's lines is its eval set). The teacher comes through
:meth:`~jkd.data.BatchSource.bind_models` once the engine has built it.

Every train and eval example carries ``domain``, its domain's index (int32): the position of its
name in ``teachers.domains`` when that is set (comma-separated names), else in the source's order
(``d0, d1, ...`` for synthetic domains; first appearance in ``ddk.path``). Several teachers route
by it (``teachers.routing='field'``, :mod:`jkd.train.teachers`). With ``ddk.floor=1`` the
mixture stays uniform and no evaluation scores the domains.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from jkd import models
from jkd.data import jsonl
from jkd.data import selection
from jkd.data.arrays import ArraySource, synthetic_lm_examples
from jkd.data.source import BatchSource
from jkd.train import config
from jkd.train.sources import text

PyTree = Any


def _ddk(cfg):
  return config.section(cfg, "ddk", needed_by="data.source='domains'")


def uses_text(cfg) -> bool:
  """Whether the domains are JSONL text (``ddk.path``), which needs the teacher's tokenizer."""
  return "ddk" in cfg and bool(cfg.ddk.path)


class DDKSource(BatchSource):
  """DDK's train source: a :class:`jkd.data.DomainMixture` whose weights follow the smoothed
  per-domain student-teacher validation gap (see the module docstring).

  Args:
    sources: ``{domain: batch source}`` of training batches.
    eval_examples: ``{domain: {"tokens", "labels", "loss_mask"} [N, T] arrays}``.
    batch_size: the global batch size.
    seed: seed of the domain draws.
    alpha, floor: :class:`jkd.data.DomainWeights` options.
    score_batch_size: documents per NLL forward pass.
  """

  def __init__(self, sources: Mapping[str, Any], eval_examples: Mapping[str, Mapping[str, Any]],
               *, batch_size: int, seed: int = 0, alpha: float = 0.5, floor: float = 0.1,
               score_batch_size: int = 8, process_index: int | None = None,
               process_count: int | None = None):
    domains = list(sources)
    if sorted(eval_examples) != sorted(domains):
      raise ValueError(f"DDK needs eval examples for every domain: train {sorted(domains)},"
                       f" eval {sorted(eval_examples)}.")
    self.weights = selection.DomainWeights(domains, alpha=alpha, floor=floor)
    self.mixture = selection.DomainMixture(sources, self.weights, batch_size, seed,
                                           process_index=process_index,
                                           process_count=process_count)
    self.eval_examples = {d: dict(v) for d, v in eval_examples.items()}
    self.score_batch_size = int(score_batch_size)
    self._teacher: tuple[PyTree, models.ModelConfig] | None = None
    self._student_config: models.ModelConfig | None = None
    self._teacher_nll: dict[str, float] | None = None

  def bind_models(self, *, teacher_params: PyTree, teacher_config: models.ModelConfig,
                  student_config: models.ModelConfig) -> None:
    self._teacher, self._student_config = (teacher_params, teacher_config), student_config
    self._teacher_nll = None

  def domain_nll(self, params: PyTree, config: models.ModelConfig) -> dict[str, float]:
    """``{domain: token-mean NLL}`` of a model on each domain's eval examples."""
    return {d: selection.mean_token_nll(params, config, ex, batch_size=self.score_batch_size)
            for d, ex in self.eval_examples.items()}

  def update_weights(self, params: PyTree) -> dict[str, float]:
    """Updates the domain weights from the student's (``params``) and the teacher's per-domain
    NLL.

    Returns:
      The new weights ``{domain: weight}``.
    """
    if self._teacher is None:
      raise ValueError("DDK's update needs the teacher: call bind_models(...) first"
                       " (jkd.train.train does).")
    if self._teacher_nll is None:  # The frozen teacher's losses never change.
      self._teacher_nll = self.domain_nll(*self._teacher)
    student = self.domain_nll(params, self._student_config)
    return self.weights.update(student, self._teacher_nll)

  def after_eval(self, metrics: Mapping[str, float], params: PyTree) -> None:
    """After each evaluation: :meth:`update_weights` with the evaluated student (nothing when
    ``floor`` is 1: the weights stay uniform whatever the gaps)."""
    del metrics
    if self.weights.floor < 1.0:
      self.update_weights(params)

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self.mixture)
    rows = len(next(iter(batch.values())))
    for d, w in self.weights.as_dict().items():
      batch[f"metric/ddk/weight/{d}"] = np.full(rows, w, np.float32)
    return batch

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    return self.mixture.one_epoch()

  def get_state(self) -> dict[str, Any]:
    """The mixture's state (its position, and the weights)."""
    return self.mixture.get_state()

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.mixture.set_state(state)


def domain_ids(cfg, names) -> dict[str, int]:
  """``{domain: the int32 'domain' field of its examples}``: the index in ``teachers.domains``
  (comma-separated names) when the config sets it, else in ``names``' order.

  Raises:
    ValueError: ``teachers.domains`` repeats a name, misses a domain of the data, or names one
      the data does not have.
  """
  names = list(names)
  order = ([s.strip() for s in str(cfg.teachers.domains).split(",")]
           if "teachers" in cfg and str(cfg.teachers.domains).strip() else names)
  if sorted(order) != sorted(names) or len(set(order)) != len(order):
    raise ValueError(f"teachers.domains {order} must name every domain of the data once, in"
                     f" teacher order; the data's domains are {names}.")
  return {name: order.index(name) for name in names}


def _with_domain(examples: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
  rows = len(next(iter(examples.values())))
  return {**examples, "domain": np.full(rows, index, np.int32)}


class _DomainField(BatchSource):
  """A domain's batch source whose batches also carry ``domain`` (its index)."""

  def __init__(self, source, index: int):
    self.source, self.index = source, int(index)

  def __next__(self) -> dict[str, np.ndarray]:
    return _with_domain(next(self.source), self.index)

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    return (_with_domain(b, self.index) for b in self.source.one_epoch())

  def get_state(self) -> Any:
    return self.source.get_state()

  def set_state(self, state: Any) -> None:
    self.source.set_state(state)


def synthetic_domain_examples(cfg, vocab: int
                              ) -> tuple[dict[str, dict[str, np.ndarray]],
                                         dict[str, dict[str, np.ndarray]]]:
  """``(train, eval)`` examples ``{domain: {"tokens", "labels", "loss_mask", "domain"}}`` of
  the ``ddk.num_domains`` synthetic domains: domain ``d<i>`` is a bigram chain of branching
  ``2 + i`` (seed ``data.seed * 1000 + i``), ``data.num_examples`` train and
  ``data.eval_examples`` eval sequences of ``data.seq_len`` tokens."""
  d, n = cfg.data, int(_ddk(cfg).num_domains)
  if n < 1:
    raise ValueError(f"ddk.num_domains must be >= 1 (got {n}) for synthetic domains.")
  ids = domain_ids(cfg, [f"d{i}" for i in range(n)])
  train, evals = {}, {}
  for i in range(n):
    ex = _with_domain(synthetic_lm_examples(d.num_examples + d.eval_examples, d.seq_len, vocab,
                                            seed=int(d.seed) * 1000 + i, branching=2 + i),
                      ids[f"d{i}"])
    train[f"d{i}"] = {k: v[:d.num_examples] for k, v in ex.items()}
    evals[f"d{i}"] = {k: v[d.num_examples:] for k, v in ex.items()}
  return train, evals


def _synthetic_domains(cfg, vocab: int):
  train, evals = synthetic_domain_examples(cfg, vocab)
  d = cfg.data
  sources = {name: ArraySource(ex, int(d.batch_size), seed=int(d.seed))
             for name, ex in train.items()}
  return sources, evals


def split_by_domain(paths, out_dir: str) -> dict[str, str]:
  """Writes the lines of JSONL ``paths`` into one file per ``domain`` field under ``out_dir``.

  Returns:
    ``{domain: path}`` in order of first appearance.

  Raises:
    ValueError: a line that is not UTF-8 JSON or lacks a non-empty string ``domain`` (file and
      line named).
  """
  groups: dict[str, list[str]] = {}
  for path in paths:
    for line_no, line in jsonl.read_text_lines(path):
      if not line.strip():
        continue
      try:
        domain = json.loads(line).get("domain")
      except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}:{line_no}: not a JSON object; each line must be one JSON"
                         " object with a 'domain' field.") from None
      if not isinstance(domain, str) or not domain:
        raise ValueError(f"{path}:{line_no}: DDK needs a non-empty 'domain' field on every"
                         " line (e.g. \"domain\": \"code\").")
      groups.setdefault(domain, []).append(line.rstrip("\n"))
  os.makedirs(out_dir, exist_ok=True)
  out = {}
  for domain, lines in groups.items():
    safe = hashlib.sha256(domain.encode()).hexdigest()[:12]
    out[domain] = os.path.join(out_dir, f"{safe}.jsonl")
    with open(out[domain], "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
  return out


def _batches_to_examples(batches) -> dict[str, np.ndarray]:
  batches = list(batches)
  if not batches:
    raise ValueError("a domain has no eval batches: raise ddk.eval_fraction or the data.")
  return {k: np.concatenate([np.asarray(b[k]) for b in batches])
          for k in ("tokens", "labels", "loss_mask", "domain") if k in batches[0]}


def _jsonl_domains(cfg, vocab: int, tokenizer):
  files = jsonl.expand_paths(jsonl.split_paths(_ddk(cfg).path))
  digest = hashlib.sha256("\0".join(sorted(files)).encode()).hexdigest()[:12]
  split_dir = os.path.join(os.path.expanduser(cfg.data.cache_dir), f"ddk_split_{digest}")
  per_domain = split_by_domain(files, split_dir)
  ids = domain_ids(cfg, per_domain)
  sources, evals = {}, {}
  for domain, path in per_domain.items():
    sub = copy.deepcopy(cfg)
    with sub.unlocked():
      sub.data.path, sub.data.eval_path = path, ""
      sub.data.eval_fraction = float(_ddk(cfg).eval_fraction)
    train, ev = text.jsonl_sources(sub, vocab, tokenizer)
    if ev is None:
      raise ValueError(f"domain {domain!r} has no eval split: set ddk.eval_fraction > 0.")
    sources[domain] = _DomainField(train, ids[domain])
    evals[domain] = _batches_to_examples(_DomainField(ev, ids[domain]).one_epoch())
  return sources, evals


def domain_sources(cfg, vocab: int, tokenizer=None) -> tuple[DDKSource, ArraySource]:
  """``data.source='domains'``: ``(DDKSource, ArraySource of every domain's eval examples)``;
  ``tokenizer`` is needed for ``ddk.path`` (text) only."""
  if _ddk(cfg).path:
    sources, evals = _jsonl_domains(cfg, vocab, tokenizer)
  else:
    sources, evals = _synthetic_domains(cfg, vocab)
  d = cfg.data
  source = DDKSource(sources, evals, batch_size=int(d.batch_size), seed=int(d.seed),
                     alpha=float(_ddk(cfg).alpha), floor=float(_ddk(cfg).floor))
  every = {k: np.concatenate([ex[k] for ex in evals.values()]) for k in next(iter(
      evals.values()))}
  eval_source = ArraySource(every, min(int(d.batch_size), len(every["tokens"])), shuffle=False)
  return source, eval_source
