"""The training-data pipeline on Grain: shuffle, shard, tokenise, pack or pad, batch, repeat.

:class:`DataPipeline` serves per-process numpy batches from a random-access source (a split of
a TFDS ArrayRecord dataset, :func:`jkd.data.open_split`) with the interface of
:class:`jkd.data.BatchSource` (like :class:`jkd.data.ArraySource`), so :func:`jkd.train.train` takes it as its ``train_source`` /
``eval_source``:

- the examples are shuffled per epoch (Grain's index shuffle from ``seed`` and the epoch) and
  repeated forever; the global stream is split by stride over the processes, so each example is
  served by exactly one process in each epoch;
- ``transform(example)`` turns a stored example into ``{"tokens", "labels", "loss_mask"}``
  ``[n]`` arrays; it may return None to skip one (counted in :attr:`DataPipeline.counts`);
- rows are padded to ``seq_len`` or packed (``pack=True``: first fit, with ``segment_ids`` and
  ``positions`` so no attention crosses documents), and stacked into ``[batch_size /
  process_count, seq_len]`` batches;
- ``get_state()`` / ``set_state()`` resume exactly (Grain's iterator state, JSON-serialisable,
  with a fingerprint of the data and batch so that a state of another pipeline is an error);
  ``one_epoch()`` is one ordered pass for evaluation that leaves the position alone.

:func:`text_pipeline` builds one for a stored dataset: JSONL shapes (:mod:`jkd.data.jsonl`) are
tokenised with :func:`jkd.data.examples.tokenize_example`; a ``tokenized`` dataset (fields
already token arrays, e.g. an offline teacher cache with ``teacher_topk_ids``) passes through,
padded to ``seq_len`` when shorter, with ``uint16`` ids cast to ``int32`` and ``float16`` to
``float32``.

>>> src = [{"tokens": np.arange(i % 3 + 2, dtype=np.int32)} for i in range(8)]
>>> pipe = DataPipeline(src, batch_size=4, seq_len=5, transform=tokenized_transform(5),
...                     process_index=0, process_count=1)
>>> b = next(pipe); b["tokens"].shape, b["labels"].dtype, b["loss_mask"].shape
((4, 5), dtype('int32'), (4, 5))
"""

from __future__ import annotations

import collections
import inspect
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from jkd.data import store
from jkd.data import examples as tok_lib
from jkd.data.source import BatchSource

Transform = Callable[[Mapping[str, Any]], "Mapping[str, np.ndarray] | None"]
#: Casts applied when batching (compact storage dtypes -> compute dtypes).
CASTS = {np.dtype(np.uint16): np.int32, np.dtype(np.uint8): np.int32,
         np.dtype(np.float16): np.float32}


def process_share(batch_size, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[int, int]:
  """``(process_index, process_count)`` of a batch source (default: JAX's), checking that the
  global ``batch_size`` is a positive int that the processes share evenly.

  >>> process_share(8, 1, 2)
  (1, 2)
  """
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int (got {batch_size!r}).")
  if batch_size % count:
    raise ValueError(f"the global batch size {batch_size} is not divisible by the {count}"
                     " processes; use a multiple of it.")
  return index, count


def _cast(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v)
  return v.astype(CASTS[v.dtype]) if v.dtype in CASTS else v


def _stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: _cast(np.stack([r[k] for r in rows])) for k in rows[0]}


def _fill_rows(v: np.ndarray, rows: int, key: str) -> np.ndarray:
  """``v`` completed to ``rows`` rows with padding (``-100`` for labels, else 0/False)."""
  if len(v) == rows:
    return v
  fill = tok_lib.IGNORE_INDEX if key == "labels" or key.endswith("_labels") else 0
  return np.concatenate([v, np.full((rows - len(v), *v.shape[1:]), fill, v.dtype)])


# ---------------------------------------------------------------------------------------------
# Packing as a resumable Grain iterator.

class _PackIterator(grain.DatasetIterator):
  """Groups of :class:`jkd.data.examples.Packer`; state = (parent state at the group's start,
  rows of the group already emitted), so a restore re-packs that group and skips those rows."""

  def __init__(self, parent, packer: tok_lib.Packer):
    super().__init__(parent)
    self._packer = packer
    self._start = self._parent.get_state()
    self._rows: list[dict] = []
    self._emitted = 0
    self._leftover = None  # (example, parent state before it)

  def _pull(self):
    state = self._parent.get_state()
    try:
      ex = next(self._parent)
    except StopIteration:
      return None
    self._last_state = state
    return ex

  def _fill(self) -> None:
    if self._leftover is not None:
      first, self._start = self._leftover
    else:
      first, self._start = None, self._parent.get_state()
    self._last_state = None
    self._rows, leftover = self._packer.group(first, self._pull)
    self._leftover = None if leftover is None else (leftover, self._last_state)
    self._emitted = 0

  def __next__(self):
    if self._emitted == len(self._rows):
      self._fill()
      if not self._rows:
        raise StopIteration
    self._emitted += 1
    return self._rows[self._emitted - 1]

  def get_state(self):
    return {"group_start": self._start, "emitted": self._emitted}

  def set_state(self, state):
    self._parent.set_state(state["group_start"])
    self._leftover = None
    self._fill()
    self._emitted = int(state["emitted"])


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent, packer: tok_lib.Packer):
    super().__init__(parent)
    self._packer = packer

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self._packer)


# ---------------------------------------------------------------------------------------------

def _gather_states(state: Any, process_count: int) -> list[Any]:
  """Every process's state (a collective when JAX runs ``process_count`` processes)."""
  if process_count == 1 or jax.process_count() != process_count:
    return [state]
  from jax.experimental import multihost_utils  # noqa: PLC0415
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:raw.size] = raw
  allraw = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(allraw[p][:int(lengths[p][0])]).decode())
          for p in range(process_count)]


class DataPipeline(BatchSource):
  """Per-process ``[batch_size / process_count, seq_len]`` batches of a random-access source.

  Args:
    source: ``len(source)`` and ``source[i]`` -> example dict (e.g. :func:`jkd.data.open_split`).
    batch_size: the global batch size (a multiple of ``process_count``).
    seq_len: row length.
    transform: example -> ``{"tokens", "labels", "loss_mask", ...}`` ``[n, ...]`` arrays
      (``n <= seq_len``) or None to skip it; called as ``transform(ex, name=..., counts=...)``
      when it takes those keywords (a name for errors, the counter to update); e.g.
      :func:`tokenized_transform`, or what :func:`text_pipeline` builds.
    seed: seed of the per-epoch shuffles.
    shuffle: False serves the examples in order.
    pack: pack documents into rows (``segment_ids``/``positions`` in the batch) instead of
      padding each one.
    num_bins: rows open at once while packing (default: the local batch size).
    process_index, process_count: this process and how many (default: JAX's).
    name: how states and errors name the data (part of the fingerprint).
    read_threads: Grain read threads (0: read in the calling thread).

  Attributes:
    counts: ``collections.Counter`` of ``skipped`` examples and the transform's counts (e.g.
      ``truncated``), for the examples read so far by this process (prefetching included).

  ``get_state()`` gathers every process's position (a collective in a multi-process JAX run:
  call it on all processes, as the checkpointer does); ``set_state()`` takes this process's.
  """

  def __init__(self, source, *, batch_size: int, seq_len: int,
               transform: Transform | None = None, seed: int = 0, shuffle: bool = True,
               pack: bool = False, num_bins: int | None = None,
               process_index: int | None = None, process_count: int | None = None,
               name: str = "data", read_threads: int = 0):
    self.source = source
    self.num_examples = len(source)
    self.process_index, self.process_count = process_share(batch_size, process_index,
                                                           process_count)
    if self.num_examples == 0:
      raise ValueError(f"{name}: the dataset is empty.")
    self.batch_size, self.seq_len, self.seed = int(batch_size), int(seq_len), int(seed)
    self.shuffle, self.pack, self.name = bool(shuffle), bool(pack), name
    self.transform = transform or tokenized_transform(seq_len)
    params = inspect.signature(self.transform).parameters
    self._transform_kwargs = "name" in params and "counts" in params
    self.local_batch_size = self.batch_size // self.process_count
    self.num_bins = int(num_bins or self.local_batch_size)
    self.read_threads = int(read_threads)
    self.counts: collections.Counter = collections.Counter()
    self._iter = iter(self._dataset(shuffle=self.shuffle, repeat=True,
                                    shard=(self.process_index, self.process_count),
                                    batch=self.local_batch_size))

  # -- the Grain graph ------------------------------------------------------------------------

  def _apply(self, item):
    index, ex = item
    if self._transform_kwargs:
      out = self.transform(ex, name=f"{self.name} example {index}", counts=self.counts)
    else:
      out = self.transform(ex)
    if out is None:
      self.counts["skipped"] += 1
    return out

  def _dataset(self, *, shuffle: bool, repeat: bool, shard: tuple[int, int], batch: int,
               drop_remainder: bool = True):
    ds = grain.MapDataset.source(self.source).map_with_index(lambda i, x: (i, x))
    if shuffle:
      ds = ds.shuffle(seed=self.seed)
    if repeat:
      ds = ds.repeat(None)
    index, count = shard
    if count > 1:
      ds = ds[index::count]
    ds = ds.map(self._apply).filter(lambda x: x is not None)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                              prefetch_buffer_size=max(1, 4 * batch)))
    if self.pack:
      it = _PackIterDataset(it, tok_lib.Packer(self.seq_len, self.num_bins))
    else:
      it = it.map(lambda ex: tok_lib.pad_example(ex, self.seq_len))
    return it.batch(batch, drop_remainder=drop_remainder, batch_fn=_stack)

  # -- the ArraySource interface --------------------------------------------------------------

  def __iter__(self) -> "DataPipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """One in-order pass (for evaluation), without moving the training position.

    Every process runs the whole pass and keeps its slice of each global batch, so all of them
    yield the same number of batches. The last global batch is completed with empty rows
    (labels ``-100``, ``loss_mask`` False), so every example is evaluated.
    """
    lo = self.process_index * self.local_batch_size
    for b in self._dataset(shuffle=False, repeat=False, shard=(0, 1), batch=self.batch_size,
                           drop_remainder=False):
      yield {k: _fill_rows(v, self.batch_size, k)[lo:lo + self.local_batch_size]
             for k, v in b.items()}

  def fingerprint(self) -> dict[str, Any]:
    return {"name": self.name, "num_examples": self.num_examples,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
            "shuffle": self.shuffle, "pack": self.pack, "num_bins": self.num_bins,
            "process_count": self.process_count}

  def get_state(self) -> dict[str, Any]:
    """The position: ``{"fingerprint", "processes": {index: Grain state}}`` (JSON-ready)."""
    state = self._iter.get_state()
    states = _gather_states(state, self.process_count)
    indices = range(self.process_count) if len(states) > 1 else [self.process_index]
    return {"kind": "jkd.data.DataPipeline", "fingerprint": self.fingerprint(),
            "processes": {str(p): s for p, s in zip(indices, states)}}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position from :meth:`get_state` of a pipeline over the same data and batch."""
    state = json.loads(json.dumps(state))  # plain dicts/lists, as read back from a checkpoint
    if state.get("kind") != "jkd.data.DataPipeline":
      raise ValueError(f"{self.name}: this data state was not written by a DataPipeline (keys"
                       f" {sorted(state)}); resume with the data source of the checkpoint, or"
                       " start a new workdir.")
    mine = self.fingerprint()
    for key, value in state["fingerprint"].items():
      if mine.get(key) != value:
        raise ValueError(f"data state from a checkpoint has {key}={value!r} but this pipeline"
                         f" has {key}={mine.get(key)!r}; resume with the same data, batch size"
                         " and data settings, or start a new workdir.")
    mine_state = state["processes"].get(str(self.process_index))
    if mine_state is None:
      raise ValueError(f"the data state holds no position for process {self.process_index}"
                       f" (it has {sorted(state['processes'])}).")
    self._iter.set_state(mine_state)


# ---------------------------------------------------------------------------------------------
# Transforms.

def tokenized_transform(seq_len: int, *, overflow: str = "error",
                        vocab_size: int | None = None) -> Callable:
  """The transform of a ``tokenized`` dataset: numeric fields pass through (strings dropped).

  ``labels`` default to the next tokens and ``loss_mask`` to ``labels != -100``. Arrays longer
  than ``seq_len`` are cut (``overflow="truncate"``, counted) or an error.
  """
  if overflow not in tok_lib.OVERFLOW:
    raise ValueError(f"overflow must be one of {tok_lib.OVERFLOW} (got {overflow!r}).")

  def transform(ex, *, name: str = "example", counts=None):
    out = {k: _cast(v) for k, v in ex.items()
           if isinstance(v, np.ndarray) and v.dtype.kind in "biuf" and v.ndim >= 1}
    if "tokens" not in out:
      raise ValueError(f"{name}: a tokenized example needs a 'tokens' array (it has"
                       f" {sorted(ex)}).")
    toks = out["tokens"] = out["tokens"].astype(np.int32)
    if "labels" not in out:
      out["labels"] = np.append(toks[1:], tok_lib.IGNORE_INDEX).astype(np.int32)
    if "loss_mask" not in out:
      out["loss_mask"] = out["labels"] != tok_lib.IGNORE_INDEX
    out["loss_mask"] = out["loss_mask"].astype(bool)
    n = len(toks)
    if n > seq_len:
      if overflow == "error":
        raise ValueError(f"{name} has {n} tokens, more than data.seq_len={seq_len}; raise"
                         " data.seq_len, or set data.overflow='truncate'.")
      if counts is not None:
        counts["truncated"] += 1
      out = {k: v[:seq_len] for k, v in out.items()}
    if vocab_size is not None and toks.size and int(toks.max()) >= vocab_size:
      raise ValueError(f"{name}: token id {int(toks.max())} is outside the model's vocabulary"
                       f" of {vocab_size}; the dataset was tokenised for another model.")
    return out

  return transform


def text_transform(tokenizer, *, shape: str, seq_len: int, chat_template: bool = True,
                   overflow: str = "truncate", vocab_size: int | None = None,
                   json_fields: Sequence[str] = ()) -> Callable:
  """The transform of a JSONL-shape dataset: decode, :func:`tokenize_example`."""
  json_fields = tuple(json_fields)

  def transform(ex, *, name: str = "example", counts=None):
    ex = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in ex.items()}
    for f in json_fields:
      if f in ex and isinstance(ex[f], str):
        ex[f] = json.loads(ex[f])
    return tok_lib.tokenize_example(ex, tokenizer, shape=shape, seq_len=seq_len,
                                    chat_template=chat_template, overflow=overflow,
                                    vocab_size=vocab_size, name=name, counts=counts)

  return transform


def text_pipeline(path: str, split: str, *, batch_size: int, seq_len: int, tokenizer=None,
                  shape: str | None = None, pack: bool = False, chat_template: bool = True,
                  overflow: str = "truncate", vocab_size: int | None = None, seed: int = 0,
                  shuffle: bool = True, process_index: int | None = None,
                  process_count: int | None = None, name: str | None = None) -> DataPipeline:
  """A :class:`DataPipeline` over ``split`` of the TFDS dataset at ``path``.

  Args:
    path: the dataset directory (``root/name`` or ``root/name/version``).
    split: e.g. ``"train"``.
    batch_size, seq_len, pack, seed, shuffle, process_index, process_count: as
      :class:`DataPipeline`.
    tokenizer: a ``transformers`` tokenizer (needed unless the data is ``tokenized``).
    shape: a JSONL shape or ``"tokenized"``; None: the dataset metadata's ``shape``, else
      ``tokenized``.
    chat_template, overflow, vocab_size: as :func:`jkd.data.examples.tokenize_example`.
    name: what the messages call the data (default ``<dataset>:<split>``), e.g. the JSONL
      files it was built from.

  Returns:
    The pipeline.
  """
  meta = store.read_metadata(path)
  shape = shape or meta.get("shape") or "tokenized"
  if shape == "tokenized":
    transform = tokenized_transform(seq_len, overflow=overflow, vocab_size=vocab_size)
  elif shape in tok_lib.TEXT_SHAPES:
    if shape == "preference":
      raise ValueError("preference data needs a preference batch source (pairs); the"
                       " tokens/labels pipeline trains on text, prompt_completion and chat.")
    if tokenizer is None:
      raise ValueError(f"a {shape!r} dataset needs a tokenizer (the teacher's).")
    transform = text_transform(tokenizer, shape=shape, seq_len=seq_len,
                               chat_template=chat_template, overflow=overflow,
                               vocab_size=vocab_size, json_fields=meta.get("json_fields", ()))
  else:
    raise ValueError(f"unknown data shape {shape!r}; choose one of"
                     f" {list(tok_lib.TEXT_SHAPES[:3]) + ['tokenized']}.")
  source = store.open_split(path, split)
  return DataPipeline(source, batch_size=batch_size, seq_len=seq_len, transform=transform,
                      seed=seed, shuffle=shuffle, pack=pack, process_index=process_index,
                      process_count=process_count,
                      name=name or (f"{os.path.basename(os.path.dirname(store.find_dataset(path)))}"
                                    f":{split}"))
