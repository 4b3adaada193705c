"""Stored text or token datasets as batch sources: ``data.source`` ``jsonl`` and ``tfds``.

``jsonl``: JSONL files (:mod:`jkd.data.jsonl` shapes) built once into a TFDS dataset under
``data.cache_dir``, named by a hash of the files' contents and the build options, so changed
files build a new one. ``tfds``: a stored TFDS dataset (``data.path``, or ``data.data_dir`` and
``data.name``). Both are served by :class:`jkd.data.DataPipeline`, text tokenised with the
teacher's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping

from jkd.data import jsonl
from jkd.data import pipeline
from jkd.data import store
from jkd.train import storage
from jkd.train.sources import cache_facts


def _cache_name(files: list[str], extra: Mapping[str, Any]) -> str:
  """``jsonl_<hash>``: a hash of the files' contents and the build options."""
  h = hashlib.sha256(json.dumps(dict(extra), sort_keys=True).encode())
  for path in files:
    h.update(b"\0file\0")
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return "jsonl_" + h.hexdigest()[:20]


def cached_dataset(files: list[str], root: str, options: Mapping[str, Any],
                   build: Callable[[str, str], str]) -> str:
  """The dataset of JSONL ``files`` under ``root``, built once by ``build(root, name)``.

  Its name hashes the files' contents and ``options``; a dataset another process finished
  meanwhile is used as it is.
  """
  root = os.path.expanduser(root)
  name = _cache_name(files, options)
  try:
    return store.find_dataset(os.path.join(root, name))
  except FileNotFoundError:
    pass
  try:
    return build(root, name)
  except FileExistsError:  # Another process built it meanwhile.
    return store.find_dataset(os.path.join(root, name))


def _local(paths: list[str], cache_dir: str) -> list[str]:
  """JSONL paths with the ``gs://`` ones copied to ``cache_dir`` (no patterns there)."""
  out = []
  for path in paths:
    if storage.is_remote(path) and any(c in path for c in "*?["):
      raise ValueError(f"data.path {path}: patterns are for local files; list the gs:// files"
                       " (comma-separated) or give their folder.")
    out.append(storage.localize(path, cache_dir))
  return out


def build_jsonl(cfg) -> str:
  """The TFDS dataset of ``data.path`` (JSONL files) under ``data.cache_dir``, built once.

  The dataset's name is a hash of the files' contents and the build options (``data.shape``,
  ``data.eval_path``, ``data.eval_fraction``, ``data.seed``), so changed files build a new one.
  """
  d = cfg.data
  if not jsonl.split_paths(d.path):
    raise ValueError("data.source='jsonl' needs data.path (a JSONL file, a glob, or a list).")
  train_files = jsonl.expand_paths(_local(jsonl.split_paths(d.path), d.cache_dir))
  eval_paths = _local(jsonl.split_paths(d.eval_path), d.cache_dir)
  eval_files = jsonl.expand_paths(eval_paths) if eval_paths else []
  options = {"shape": d.shape or None, "eval_fraction": float(d.eval_fraction),
             "seed": int(d.seed) if d.eval_fraction else 0}
  return cached_dataset(
      train_files + eval_files, d.cache_dir,
      {**options, "n_train": len(train_files), "n_eval": len(eval_files)},
      lambda root, name: jsonl.build_jsonl_dataset(
          train_files, root, name, shape=options["shape"],
          splits={"eval": eval_files} if eval_files else None,
          eval_fraction=options["eval_fraction"], seed=options["seed"]))


def tfds_path(cfg) -> str:
  """The stored dataset of ``data.source='tfds'``."""
  d = cfg.data
  if d.path:  # A gs:// dataset is copied to data.cache_dir once (storage.localize).
    return storage.localize(os.path.expanduser(str(d.path)), d.cache_dir)
  if not d.name or not d.data_dir:
    raise ValueError("data.source='tfds' needs data.path (a TFDS dataset directory) or"
                     " data.name and data.data_dir.")
  return storage.localize(storage.join(os.path.expanduser(d.data_dir), d.name), d.cache_dir)


def is_text(cfg) -> bool:
  """Whether the configured stored dataset needs tokenising (not ``tokenized`` data)."""
  if cfg.data.shape:
    return cfg.data.shape != "tokenized"
  if cfg.data.source != "tfds":
    return True
  return store.read_metadata(tfds_path(cfg)).get("shape", "tokenized") != "tokenized"


def check_tokenizer(tokenizer, vocab: int) -> None:
  """A tokenizer with more ids than the model's vocabulary belongs to another model."""
  if tokenizer is not None and len(tokenizer) > vocab:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary"
                     f" has {vocab}: they do not belong together; use the teacher's"
                     " tokenizer.")


def _pipelines(path: str, cfg, vocab: int, tokenizer, described: str | None = None):
  """``(train, eval or None)`` DataPipelines over a stored dataset (``described``: what the
  messages name, e.g. its JSONL files)."""
  d = cfg.data
  check_tokenizer(tokenizer, vocab)
  splits = set(store.read_metadata(path).get("splits", ())) or None
  eval_split = d.eval_split or ("eval" if splits and "eval" in splits else "")
  kw = dict(tokenizer=tokenizer, shape=d.shape or None, seq_len=int(d.seq_len),
            pack=bool(d.pack), chat_template=bool(d.chat_template), overflow=d.overflow,
            vocab_size=vocab)
  dataset = os.path.basename(os.path.dirname(store.find_dataset(path)))  # (a content hash)
  name = ((lambda split: f"{described} ({dataset}:{split})") if described
          else (lambda split: None))
  train = pipeline.text_pipeline(path, d.split, batch_size=int(d.batch_size),
                                 seed=int(d.seed), name=name(d.split), **kw)
  evals = None
  if eval_split:
    evals = pipeline.text_pipeline(path, eval_split, batch_size=int(d.batch_size),
                                   shuffle=False, name=name(eval_split), **kw)
  return train, evals


def jsonl_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='jsonl'``: ``(train, eval or None)``."""
  return _pipelines(build_jsonl(cfg), cfg, vocab, tokenizer, described=cfg.data.path)


def tfds_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='tfds'``: ``(train, eval or None)``; a FIRST / Swing teacher cache's facts
  are reported by the run (:mod:`jkd.train.sources.cache_facts`)."""
  path = tfds_path(cfg)
  train, evals = _pipelines(path, cfg, vocab, tokenizer)
  return cache_facts.with_cache_facts(train, path), evals
