"""Preference pairs as batch sources: ``data.source`` ``preference`` (text pairs from JSONL files
or a TFDS dataset, tokenised with the teacher's tokenizer) and ``synthetic_pairs``; with
``data.shape="unpaired"`` each pair becomes two KTO rows (:class:`UnpairedSource`).

Step-DPO and TPO (:mod:`jkd.data.ranked`): ``step_pairs`` (JSONL files of ``{"prompt", "prefix",
"chosen_step", "rejected_step"}``, each a pair whose context is the prompt and the correct
prefix, labels on the step), ``ranked`` (JSONL files of ``{"prompt", "responses", "scores"}``:
list batches of ``K`` = the longest list in the files) and ``synthetic_ranked`` (random lists of
up to :data:`SYNTHETIC_LIST_SIZE` responses). These are read and tokenised into memory once.
"""

from __future__ import annotations

import os

import numpy as np

from jkd.data import jsonl
from jkd.data import pipeline
from jkd.data import preference
from jkd.data import ranked
from jkd.data import store
from jkd.data.arrays import ArraySource, synthetic_pair_examples
from jkd.data.source import BatchSource
from jkd.train.sources import text

#: Responses per prompt of ``data.source='synthetic_ranked'`` (lists hold 2 to this many).
SYNTHETIC_LIST_SIZE = 4


class UnpairedSource(BatchSource):
  """KTO batches from a source of paired batches: the ``B`` pairs of a batch become ``2B`` rows,
  the chosen completions first (``desirable`` True), then the rejected ones (False), so that
  KTO's mismatched pairs (row ``i`` with row ``i + 1``) never share a prompt when ``B > 1``.

  Args:
    source: a source of paired batches (``chosen_tokens``, ``chosen_labels``,
      ``rejected_tokens``, ``rejected_labels``, ``[B, T]`` each) with ``get_state``/``set_state``.

  >>> pairs = {"chosen_tokens": np.array([[1, 2], [3, 4]]), "chosen_labels": np.array([[2, 9],
  ...          [4, 9]]), "rejected_tokens": np.array([[1, 5], [3, 6]]),
  ...          "rejected_labels": np.array([[5, 9], [6, 9]])}
  >>> batch = next(UnpairedSource(iter([pairs])))
  >>> batch["tokens"].tolist(), batch["desirable"].tolist()
  ([[1, 2], [3, 4], [1, 5], [3, 6]], [True, True, False, False])
  """

  def __init__(self, source):
    self.source = source

  def __next__(self) -> dict[str, np.ndarray]:
    pairs = next(self.source)
    b = np.shape(pairs["chosen_tokens"])[0]
    out = {"tokens": np.concatenate([pairs["chosen_tokens"], pairs["rejected_tokens"]]),
           "labels": np.concatenate([pairs["chosen_labels"], pairs["rejected_labels"]]),
           "desirable": np.repeat(np.array([True, False]), b)}
    if "chosen_loss_mask" in pairs:
      out["loss_mask"] = np.concatenate([pairs["chosen_loss_mask"],
                                         pairs["rejected_loss_mask"]]).astype(bool)
    return out

  def get_state(self):
    return self.source.get_state()

  def set_state(self, state) -> None:
    self.source.set_state(state)


def _preference_batches(cfg, train):
  """``(train, None)``: pairs as they are, or KTO rows with ``data.shape="unpaired"``."""
  shape = cfg.data.shape
  if shape not in ("", "preference", "unpaired"):
    raise ValueError(f"data.source={cfg.data.source!r} serves preference pairs: data.shape must"
                     f" be '' (pairs) or 'unpaired' (KTO batches), not {shape!r}.")
  if shape == "unpaired":
    if int(cfg.data.batch_size) % 2:
      raise ValueError(f"data.shape='unpaired' makes 2 rows of each pair: data.batch_size"
                       f" ({cfg.data.batch_size}) must be even.")
    return UnpairedSource(train), None
  return train, None


def synthetic_pair_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='synthetic_pairs'``: random pairs of ``data.num_examples``."""
  del tokenizer
  d = cfg.data
  ex = synthetic_pair_examples(int(d.num_examples), int(d.seq_len), vocab, seed=int(d.seed))
  rows = int(d.batch_size) // (2 if d.shape == "unpaired" else 1)
  return _preference_batches(cfg, ArraySource(ex, max(rows, 1), seed=int(d.seed)))


def _preference_dataset(cfg) -> str:
  """The TFDS dataset of ``data.path``: a dataset directory as is, JSONL files built once."""
  d = cfg.data
  paths = jsonl.split_paths(d.path)
  if not paths:
    raise ValueError("data.source='preference' needs data.path: JSONL files of {'prompt',"
                     " 'chosen', 'rejected'} text, or a TFDS preference dataset directory.")
  if len(paths) == 1 and os.path.isdir(os.path.expanduser(paths[0])):
    return os.path.expanduser(paths[0])
  files = jsonl.expand_paths(paths)
  return text.cached_dataset(
      files, d.cache_dir, {"shape": "preference", "n_train": len(files)},
      lambda root, name: jsonl.build_jsonl_dataset(files, root, name, shape="preference"))


def preference_sources(cfg, vocab: int, tokenizer):
  """``data.source='preference'``: text pairs (JSONL or a TFDS dataset), tokenised."""
  d = cfg.data
  path = _preference_dataset(cfg)
  shape = store.read_metadata(path).get("shape")
  if shape not in (None, "preference"):
    raise ValueError(f"{path} is a {shape!r} dataset, not preference pairs ({{'prompt',"
                     " 'chosen', 'rejected'}}); use data.source='jsonl'/'tfds' for it.")
  text.check_tokenizer(tokenizer, vocab)
  overflow = {"truncate": "truncate", "error": "error"}.get(d.overflow)
  if overflow is None:
    raise ValueError(f"data.overflow must be 'truncate' or 'error' (got {d.overflow!r}).")
  seq_len, chat = int(d.seq_len), bool(d.chat_template)

  def transform(ex, *, name: str = "pair", counts=None):
    del counts
    try:
      return preference.tokenize_preference(ex, tokenizer, seq_len=seq_len, chat_template=chat,
                                            overflow=overflow)
    except ValueError as e:
      raise ValueError(f"{name} of {path}: {e}") from None

  rows = int(d.batch_size) // (2 if d.shape == "unpaired" else 1)
  train = pipeline.DataPipeline(store.open_split(path, d.split), batch_size=max(rows, 1),
                                seq_len=seq_len, transform=transform, seed=int(d.seed),
                                name=f"{os.path.basename(os.path.dirname(store.find_dataset(path)))}"
                                     f":{d.split}")
  return _preference_batches(cfg, train)


# ---------------------------------------------------------------------------------------------
# Step pairs (Step-DPO) and ranked lists (TPO)


def _jsonl_paths(cfg, shape: str) -> list[str]:
  paths = jsonl.split_paths(cfg.data.path)
  if not paths:
    raise ValueError(f"data.source={cfg.data.source!r} needs data.path: JSONL files of {shape}.")
  return jsonl.expand_paths(paths)


def _overflow(cfg) -> str:
  if cfg.data.overflow not in ("truncate", "error"):
    raise ValueError(f"data.overflow must be 'truncate' or 'error' (got {cfg.data.overflow!r}).")
  return cfg.data.overflow


def _array_source(cfg, examples, rows: int) -> ArraySource:
  n = len(examples["example_index"])
  examples = {k: v for k, v in examples.items() if k != "example_index"}
  if n < rows:
    raise ValueError(f"data.source={cfg.data.source!r}: {n} examples in {cfg.data.path} but a"
                     f" batch needs {rows}; add data or lower data.batch_size.")
  return ArraySource(examples, rows, seed=int(cfg.data.seed))


def step_pair_sources(cfg, vocab: int, tokenizer):
  """``data.source='step_pairs'``: Step-DPO pairs from JSONL (:func:`jkd.data.ranked
  .read_step_pairs_jsonl`), tokenised with the teacher's tokenizer; ``data.shape='unpaired'``
  gives KTO rows as for ``preference``."""
  d = cfg.data
  text.check_tokenizer(tokenizer, vocab)
  examples = ranked.read_step_pairs_jsonl(
      _jsonl_paths(cfg, ranked.STEP_EXAMPLE), tokenizer, seq_len=int(d.seq_len),
      chat_template=bool(d.chat_template), overflow=_overflow(cfg))
  rows = max(int(d.batch_size) // (2 if d.shape == "unpaired" else 1), 1)
  return _preference_batches(cfg, _array_source(cfg, examples, rows))


def _list_batches(cfg, source):
  if cfg.data.shape not in ("", "ranked"):
    raise ValueError(f"data.source={cfg.data.source!r} serves ranked lists: data.shape must be"
                     f" '' (got {cfg.data.shape!r}).")
  return source, None


def ranked_sources(cfg, vocab: int, tokenizer):
  """``data.source='ranked'``: TPO's ranked lists from JSONL (:func:`jkd.data.ranked
  .read_ranked_jsonl`), tokenised with the teacher's tokenizer; list batches ``[B, K, T]`` with
  ``K`` the longest list of the files."""
  d = cfg.data
  text.check_tokenizer(tokenizer, vocab)
  examples = ranked.read_ranked_jsonl(
      _jsonl_paths(cfg, ranked.RANKED_EXAMPLE), tokenizer, seq_len=int(d.seq_len),
      chat_template=bool(d.chat_template), overflow=_overflow(cfg))
  return _list_batches(cfg, _array_source(cfg, examples, int(d.batch_size)))


def synthetic_ranked_sources(cfg, vocab: int, tokenizer=None):
  """``data.source='synthetic_ranked'``: ``data.num_examples`` random ranked lists."""
  del tokenizer
  d = cfg.data
  ex = ranked.synthetic_ranked_examples(int(d.num_examples), int(d.seq_len), vocab,
                                        list_size=SYNTHETIC_LIST_SIZE, seed=int(d.seed))
  return _list_batches(cfg, ArraySource(ex, int(d.batch_size), seed=int(d.seed)))
