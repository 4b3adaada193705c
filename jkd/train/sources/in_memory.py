"""In-memory batch sources: ``data.source`` ``synthetic`` (a random bigram chain) and ``npz``
(``[N, T]`` arrays from ``.npz`` files), served by :class:`jkd.data.ArraySource`."""

from __future__ import annotations

import os

import numpy as np

from jkd.data.arrays import ArraySource, check_token_arrays, read_npz, synthetic_lm_examples


def load_npz(path: str, vocab: int) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` of ``tokens`` and ``labels`` (and optionally ``loss_mask``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: an unreadable file, a missing array, arrays of other shapes than ``tokens``,
      non-integer ids, or ids outside ``[0, vocab)`` (labels may also be -100); the message
      names the file and the array (:func:`jkd.data.arrays.check_token_arrays`).
  """
  path = os.path.expanduser(path)
  ex = read_npz(path, ("tokens", "labels"), what="data.source='npz'")
  check_token_arrays(ex, path, vocab=vocab)
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
