"""In-memory batch sources: ``data.source`` ``synthetic`` (a random bigram chain) and ``npz``
(``[N, T]`` arrays from ``.npz`` files), served by :class:`jkd.data.ArraySource`."""

from __future__ import annotations

import os

import numpy as np

from jkd.data.arrays import ArraySource, synthetic_lm_examples
from jkd.losses import IGNORE_INDEX


def load_npz(path: str, vocab: int) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` of ``tokens`` and ``labels`` (ids checked against ``vocab``)."""
  with np.load(os.path.expanduser(path)) as f:
    ex = {k: f[k] for k in f.files}
  if "tokens" not in ex or "labels" not in ex:
    raise ValueError(f"{path!r} needs 'tokens' and 'labels' arrays; it has {sorted(ex)}.")
  labels = ex["labels"][ex["labels"] != IGNORE_INDEX]
  for name, ids in (("token", ex["tokens"]), ("label", labels)):
    if ids.size and (ids.max() >= vocab or ids.min() < 0):
      raise ValueError(f"{path!r} has {name} ids outside [0, {vocab}) (the teacher's"
                       " vocabulary; labels may also be -100).")
  return ex


def array_sources(cfg, train_ex, eval_ex) -> tuple[ArraySource, ArraySource | None]:
  """``(train, eval or None)`` ArraySources of example dicts (eval in order)."""
  train = ArraySource(train_ex, cfg.data.batch_size, seed=cfg.data.seed)
  evals = (ArraySource(eval_ex, min(cfg.data.batch_size, len(eval_ex["tokens"])), shuffle=False)
           if eval_ex is not None else None)
  return train, evals


def synthetic_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='synthetic'``: ``data.num_examples`` + ``data.eval_examples`` sequences."""
  del tokenizer
  d = cfg.data
  ex = synthetic_lm_examples(d.num_examples + d.eval_examples, d.seq_len, vocab, seed=d.seed)
  return array_sources(cfg, {k: v[:d.num_examples] for k, v in ex.items()},
                       {k: v[d.num_examples:] for k, v in ex.items()} if d.eval_examples
                       else None)


def npz_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='npz'``: ``data.path`` (and ``data.eval_path``) ``.npz`` files."""
  del tokenizer
  d = cfg.data
  return array_sources(cfg, load_npz(d.path, vocab),
                       load_npz(d.eval_path, vocab) if d.eval_path else None)
