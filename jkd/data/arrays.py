"""In-memory batch sources: :class:`ArraySource`, and synthetic examples for tests and CPU runs.

:class:`ArraySource` serves ``[batch, seq]`` batches from in-memory arrays: the global batch
order is a permutation drawn from ``(seed, epoch)``, each process gets its slice of every global
batch, and :meth:`ArraySource.get_state` / :meth:`ArraySource.set_state` make a restored source
yield exactly the batches the interrupted one would have yielded next.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jkd.data.pipeline import process_share
from jkd.data.scoring import sequence_layout
from jkd.data.source import BatchSource
from jkd.losses import IGNORE_INDEX

#: ``[N, T]`` arrays that must have the shape of the tokens next to them (after any prefix).
SEQUENCE_FIELDS = ("labels", "loss_mask", "attention_mask", "positions", "segment_ids")


class ArraySource(BatchSource):
  """Shuffled, per-process batches of a dict of ``[N, T]`` arrays, with a resumable position.

  Every epoch visits ``N // batch_size`` global batches (the remainder is dropped) in an order
  drawn from ``(seed, epoch)``; process ``p`` of ``P`` receives rows ``[p*B/P, (p+1)*B/P)`` of
  each global batch of ``B`` examples.

  Args:
    examples: ``{name: [N, ...] array}``, e.g. ``tokens``, ``labels``, ``loss_mask``; all with
      the same ``N``.
    batch_size: the global batch size ``B`` (a multiple of ``process_count``).
    seed: seed of the shuffles.
    shuffle: False serves the examples in order (e.g. for evaluation).
    process_index, process_count: this process and the number of processes (default: JAX's).

  >>> src = ArraySource({"tokens": np.arange(12).reshape(6, 2)}, batch_size=2, seed=0,
  ...                   process_index=0, process_count=1)
  >>> first = next(src)["tokens"]; state = src.get_state(); second = next(src)["tokens"]
  >>> src.set_state(state); bool((next(src)["tokens"] == second).all())
  True
  """

  def __init__(self, examples: Mapping[str, Any], batch_size: int, seed: int = 0, *,
               shuffle: bool = True, process_index: int | None = None,
               process_count: int | None = None):
    self.examples = {k: np.asarray(v) for k, v in examples.items()}
    if not self.examples:
      raise ValueError("ArraySource needs at least one array (e.g. {'tokens': ...}).")
    sizes = {k: v.shape[0] if v.ndim else None for k, v in self.examples.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(f"every array needs the same leading size N; got {sizes}.")
    self.num_examples = next(iter(sizes.values()))
    self.process_index, self.process_count = process_share(batch_size, process_index,
                                                           process_count)
    if batch_size > self.num_examples:
      raise ValueError(f"batch_size {batch_size} exceeds the {self.num_examples} examples.")
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self._epoch, self._index = 0, 0
    self._order = self._epoch_order(0)

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.batch_size

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def _epoch_order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

  def _take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    lo = self.process_index * self.local_batch_size
    local = rows[lo:lo + self.local_batch_size]
    return {k: v[local] for k, v in self.examples.items()}

  def __next__(self) -> dict[str, np.ndarray]:
    if self._index == self.batches_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
      self._order = self._epoch_order(self._epoch)
    b = self.batch_size
    batch = self._take(self._order[self._index * b:(self._index + 1) * b])
    self._index += 1
    return batch

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the data in epoch 0's order, without moving the source's position."""
    order, b = self._epoch_order(0), self.batch_size
    for i in range(self.batches_per_epoch):
      yield self._take(order[i * b:(i + 1) * b])

  def get_state(self) -> dict[str, int]:
    """The position (JSON-serialisable); :meth:`set_state` of it resumes at the next batch."""
    return {"epoch": self._epoch, "index": self._index, "seed": self.seed,
            "num_examples": self.num_examples, "batch_size": self.batch_size}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position from :meth:`get_state` of a source over the same data."""
    for key in ("seed", "num_examples", "batch_size"):
      if int(state[key]) != getattr(self, key):
        raise ValueError(f"data state from a checkpoint has {key}={state[key]} but this source"
                         f" has {key}={getattr(self, key)}; resume with the same data and batch"
                         " size, or start a new workdir.")
    if not 0 <= int(state["index"]) <= self.batches_per_epoch:
      raise ValueError(f"data state index {state['index']} is outside [0,"
                       f" {self.batches_per_epoch}].")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order = self._epoch_order(self._epoch)


def synthetic_lm_examples(n: int, seq_len: int, vocab: int, seed: int = 0, *,
                          branching: int = 4) -> dict[str, np.ndarray]:
  """Sequences from a fixed random bigram chain (each token has ``branching`` successors).

  Learnable (a model can drive its cross-entropy towards ``log(branching)``) and deterministic
  in ``seed``: for tests and CPU-sized configs.

  Returns:
    ``{"tokens": [n, seq_len] int32, "labels": [n, seq_len] int32, "loss_mask": [n, seq_len]
    bool}``: ``labels`` are the next tokens (the chain is drawn one token longer), every
    position counts.

  >>> ex = synthetic_lm_examples(2, 5, 11, seed=0)
  >>> ex["tokens"].shape, bool((ex["labels"][:, :-1] == ex["tokens"][:, 1:]).all())
  ((2, 5), True)
  """
  if min(n, seq_len, vocab, branching) <= 0:
    raise ValueError(f"n, seq_len, vocab and branching must be positive (got {n}, {seq_len},"
                     f" {vocab}, {branching}).")
  rng = np.random.default_rng(seed)
  successors = rng.integers(0, vocab, size=(vocab, branching))
  seqs = np.empty((n, seq_len + 1), np.int32)
  seqs[:, 0] = rng.integers(0, vocab, size=n)
  for t in range(seq_len):
    seqs[:, t + 1] = successors[seqs[:, t], rng.integers(0, branching, size=n)]
  return {"tokens": seqs[:, :-1], "labels": seqs[:, 1:],
          "loss_mask": np.ones((n, seq_len), bool)}


def synthetic_pair_examples(n: int, seq_len: int, vocab: int, seed: int = 0
                            ) -> dict[str, np.ndarray]:
  """Random preference pairs of token ids (for tests and CPU-sized configs).

  Each pair has a prompt of 2 to ``seq_len // 2`` random ids and two different completions of
  1 to ``seq_len - prompt`` random ids, laid out as :func:`jkd.data.tokenize_preference` does
  (right-padded with 0, labels on the completion only). Deterministic in ``seed``.

  Returns:
    ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}``, ``[n,
    seq_len]`` int32 each.

  >>> ex = synthetic_pair_examples(3, 8, 16)
  >>> ex["chosen_tokens"].shape, bool((ex["chosen_labels"][:, 0] == -100).all())
  ((3, 8), True)
  """
  if n <= 0 or seq_len < 4 or vocab < 2:
    raise ValueError(f"synthetic pairs need n >= 1, seq_len >= 4 and vocab >= 2 (got {n},"
                     f" {seq_len}, {vocab}).")
  rng = np.random.default_rng(seed)
  out = {k: np.empty((n, seq_len), np.int32) for k in
         ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")}
  for i in range(n):
    prompt = rng.integers(1, vocab, size=rng.integers(2, seq_len // 2 + 1)).tolist()
    room = seq_len - len(prompt)
    chosen = rng.integers(1, vocab, size=rng.integers(1, room + 1)).tolist()
    rejected = chosen
    while rejected == chosen:
      rejected = rng.integers(1, vocab, size=rng.integers(1, room + 1)).tolist()
    for side, comp in (("chosen", chosen), ("rejected", rejected)):
      out[f"{side}_tokens"][i], out[f"{side}_labels"][i] = sequence_layout(prompt, comp,
                                                                           seq_len, 0)
  return out


def read_npz(path: str, required: Sequence[str], *, what: str) -> dict[str, np.ndarray]:
  """All arrays of an ``.npz`` file, which must hold ``required``.

  Args:
    path: the file (``~`` expanded).
    required: names of the arrays it must hold.
    what: what the file is for, for the messages (e.g. ``"data.source='npz'"``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a readable ``.npz`` (e.g. truncated), or a required array missing; the
      message names the file.
  """
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no .npz file at {path!r} ({what}); check the path.")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({e}); it may be truncated: write it"
                     " again with numpy.savez.") from None
  missing = [k for k in required if k not in arrays]
  if missing:
    raise ValueError(f"{path}: missing array(s) {missing}; {what} needs [N, T] integer arrays"
                     f" {list(required)} (the file has {sorted(arrays)}).")
  return arrays


def _first_bad(ids: np.ndarray, bad: np.ndarray) -> str:
  at = tuple(int(i) for i in np.argwhere(bad)[0])
  return f"{int(ids[at])} at {list(at)}"


def check_token_arrays(arrays: Mapping[str, np.ndarray], path: str, *, vocab: int,
                       prefix: str = "") -> tuple[int, int]:
  """Checks the ``[N, T]`` arrays of one kind of sequence in a file before training on them.

  ``{prefix}tokens`` must be a non-empty 2-D integer array of ids in ``[0, vocab)``;
  ``{prefix}labels`` (required) and the other :data:`SEQUENCE_FIELDS` present must have its
  shape, labels integer ids in ``[0, vocab)`` or ``IGNORE_INDEX`` (-100); every other array
  must have ``N`` rows.

  Args:
    arrays: ``{name: array}``, e.g. from :func:`read_npz`.
    path: the file, named in the messages.
    vocab: the teacher's vocabulary size.
    prefix: e.g. ``"chosen_"`` for the ``chosen_tokens`` of preference pairs.

  Returns:
    ``(N, T)``.

  Raises:
    ValueError: naming the file, the array and its shape or its first bad id.

  >>> ex = synthetic_lm_examples(2, 3, 9)
  >>> check_token_arrays(ex, "a.npz", vocab=9)
  (2, 3)
  >>> check_token_arrays({**ex, "labels": ex["labels"][:, :2]}, "a.npz", vocab=9)
  ... # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: a.npz: 'labels' has shape (2, 2) but 'tokens' has shape (2, 3); every [N, T] ...
  """
  name = f"{prefix}tokens"
  tokens = np.asarray(arrays[name])
  if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{path}: {name!r} must be a 2-D [N, T] array of integer token ids; it has"
                     f" shape {tokens.shape} and dtype {tokens.dtype}.")
  if not tokens.size:
    raise ValueError(f"{path}: {name!r} is empty (shape {tokens.shape}); the file holds no"
                     " examples.")
  for field in SEQUENCE_FIELDS:
    other = f"{prefix}{field}"
    if other not in arrays:
      continue
    value = np.asarray(arrays[other])
    if value.shape != tokens.shape:
      why = ("labels[i, t] is the token after tokens[i, t]" if field == "labels"
             else f"{other}[i, t] belongs to {name}[i, t]")
      raise ValueError(f"{path}: {other!r} has shape {value.shape} but {name!r} has shape"
                       f" {tokens.shape}; every [N, T] array must have the tokens' shape"
                       f" ({why}): write the file again with matching arrays.")
    if field != "loss_mask" and not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{path}: {other!r} must hold integers; it has dtype {value.dtype}.")
  n = tokens.shape[0]
  for other, value in arrays.items():
    if other.startswith(prefix) and (np.ndim(value) == 0 or np.shape(value)[0] != n):
      raise ValueError(f"{path}: {other!r} has shape {np.shape(value)} but {name!r} has {n}"
                       f" rows (shape {tokens.shape}); every array needs one row per example.")
  bad = (tokens < 0) | (tokens >= vocab)
  if bad.any():
    raise ValueError(f"{path}: token ids outside [0, {vocab}) (the teacher's vocabulary) in"
                     f" {name!r}: {_first_bad(tokens, bad)}; tokenize with the teacher's"
                     " tokenizer.")
  labels = np.asarray(arrays[f"{prefix}labels"])
  bad = ((labels < 0) | (labels >= vocab)) & (labels != IGNORE_INDEX)
  if bad.any():
    raise ValueError(f"{path}: label ids outside [0, {vocab}) (the teacher's vocabulary) and"
                     f" not the ignore id {IGNORE_INDEX} in {prefix + 'labels'!r}:"
                     f" {_first_bad(labels, bad)}; tokenize with the teacher's tokenizer and"
                     f" mark positions without a target with {IGNORE_INDEX}.")
  return tuple(int(d) for d in tokens.shape)
