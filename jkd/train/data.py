"""A minimal deterministic, checkpointable batch source (until the Grain pipeline lands).

:class:`ArraySource` serves ``[batch, seq]`` batches from in-memory arrays: the global batch
order is a permutation drawn from ``(seed, epoch)``, each process gets its slice of every global
batch, and :meth:`ArraySource.get_state` / :meth:`ArraySource.set_state` make a restored source
yield exactly the batches the interrupted one would have yielded next. Any object with
``__next__``, ``get_state`` and ``set_state`` can replace it in :func:`jkd.train.train`.

:func:`make_sources` builds the train and eval sources of a config's ``data`` section
(:data:`DATA_SOURCES`: synthetic bigram data, ``.npz`` files of ``[N, T]`` arrays, JSONL files
built once into a cached TFDS dataset, or a stored TFDS dataset; the last two are served by
:class:`jkd.data.DataPipeline` and tokenised with the teacher's tokenizer, :func:`tokenizer_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from jkd.data.pipeline import process_share
from jkd.losses import IGNORE_INDEX


class ArraySource:
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

  def __iter__(self) -> "ArraySource":
    return self

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


# ---------------------------------------------------------------------------------------------
# The config's data (``data.source``).

def _synthetic(cfg, vocab: int):
  d = cfg.data
  ex = synthetic_lm_examples(d.num_examples + d.eval_examples, d.seq_len, vocab, seed=d.seed)
  return ({k: v[:d.num_examples] for k, v in ex.items()},
          {k: v[d.num_examples:] for k, v in ex.items()} if d.eval_examples else None)


def _load_npz(path: str, vocab: int) -> dict[str, np.ndarray]:
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


def _arrays(examples_fn):
  """An in-memory ``(cfg, vocab) -> (train, eval examples)`` source as ArraySources."""

  def sources(cfg, vocab: int, tokenizer=None):
    del tokenizer
    train_ex, eval_ex = examples_fn(cfg, vocab)
    train_src = ArraySource(train_ex, cfg.data.batch_size, seed=cfg.data.seed)
    eval_src = (ArraySource(eval_ex, min(cfg.data.batch_size, len(eval_ex["tokens"])),
                            shuffle=False) if eval_ex is not None else None)
    return train_src, eval_src

  sources.needs_tokenizer = False
  return sources


def _jsonl_cache_name(files: list[str], extra: Mapping[str, Any]) -> str:
  """``jsonl_<hash>``: a hash of the files' contents and the build options."""
  h = hashlib.sha256(json.dumps(dict(extra), sort_keys=True).encode())
  for path in files:
    h.update(b"\0file\0")
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return "jsonl_" + h.hexdigest()[:20]


def _paths(value) -> list[str]:
  """Paths of a config value: a list, or a string of comma-separated paths/globs."""
  if isinstance(value, str):
    return [p.strip() for p in value.split(",") if p.strip()]
  return [str(v) for v in value]


def build_jsonl(cfg) -> str:
  """The TFDS dataset of ``data.path`` (JSONL files) under ``data.cache_dir``, built once.

  The dataset's name is a hash of the files' contents and the build options (``data.shape``,
  ``data.eval_path``, ``data.eval_fraction``, ``data.seed``), so changed files build a new one.
  """
  from jkd.data import jsonl, store  # noqa: PLC0415

  d = cfg.data
  if not _paths(d.path):
    raise ValueError("data.source='jsonl' needs data.path (a JSONL file, a glob, or a list).")
  train_files = jsonl.expand_paths(_paths(d.path))
  eval_files = jsonl.expand_paths(_paths(d.eval_path)) if _paths(d.eval_path) else []
  options = {"shape": d.shape or None, "eval_fraction": float(d.eval_fraction),
             "seed": int(d.seed) if d.eval_fraction else 0}
  name = _jsonl_cache_name(train_files + eval_files, {**options, "n_train": len(train_files),
                                                      "n_eval": len(eval_files)})
  root = os.path.expanduser(d.cache_dir)
  try:
    return store._find(os.path.join(root, name))  # pylint: disable=protected-access
  except FileNotFoundError:
    pass
  try:
    return jsonl.build_jsonl_dataset(train_files, root, name, shape=options["shape"],
                                     splits={"eval": eval_files} if eval_files else None,
                                     eval_fraction=options["eval_fraction"],
                                     seed=options["seed"])
  except FileExistsError:  # Another process built it meanwhile.
    return store._find(os.path.join(root, name))  # pylint: disable=protected-access


def _tfds_path(cfg) -> str:
  d = cfg.data
  if d.path:
    return os.path.expanduser(str(d.path))
  if not d.name or not d.data_dir:
    raise ValueError("data.source='tfds' needs data.path (a TFDS dataset directory) or"
                     " data.name and data.data_dir.")
  return os.path.join(os.path.expanduser(d.data_dir), d.name)


def _pipelines(path_fn):
  """A stored-dataset ``(cfg, vocab, tokenizer) -> (train, eval)`` source of DataPipelines."""

  def sources(cfg, vocab: int, tokenizer=None):
    from jkd.data import pipeline, store  # noqa: PLC0415

    d = cfg.data
    path = path_fn(cfg)
    if tokenizer is not None and len(tokenizer) > vocab:
      raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary"
                       f" has {vocab}: they do not belong together; use the teacher's"
                       " tokenizer.")
    splits = set(store.read_metadata(path).get("splits", ())) or None
    eval_split = d.eval_split or ("eval" if splits and "eval" in splits else "")
    kw = dict(tokenizer=tokenizer, shape=d.shape or None, seq_len=int(d.seq_len),
              pack=bool(d.pack), chat_template=bool(d.chat_template), overflow=d.overflow,
              vocab_size=vocab)
    train = pipeline.text_pipeline(path, d.split, batch_size=int(d.batch_size),
                                   seed=int(d.seed), **kw)
    evals = None
    if eval_split:
      evals = pipeline.text_pipeline(path, eval_split, batch_size=int(d.batch_size),
                                     shuffle=False, **kw)
    return train, evals

  sources.needs_tokenizer = True
  return sources


#: ``data.source`` -> ``(cfg, vocab, tokenizer) -> (train source, eval source or None)``;
#: ``.needs_tokenizer`` says whether :func:`make_sources` must find the teacher's tokenizer.
DATA_SOURCES: dict[str, Callable[..., tuple[Any, Any]]] = {
    "synthetic": _arrays(_synthetic),
    "npz": _arrays(lambda cfg, vocab: (_load_npz(cfg.data.path, vocab),
                                       _load_npz(cfg.data.eval_path, vocab)
                                       if cfg.data.eval_path else None)),
    "jsonl": _pipelines(build_jsonl),
    "tfds": _pipelines(_tfds_path),
}


def _corpus_sources(cfg, vocab, tokenizer):
  raise ValueError("data.source='teacher_corpus' is prepared by `python -m jkd.train` (or"
                   " jkd.train.stages.run), which writes the corpus in the workdir first; from"
                   " Python call jkd.train.stages.run(cfg, workdir) instead of train().")


_corpus_sources.needs_tokenizer = False
DATA_SOURCES["teacher_corpus"] = _corpus_sources


def _rounds(cfg, vocab: int, tokenizer=None):
  """Distillation-DPO rounds (:func:`jkd.train.rounds.round_sources`)."""
  from jkd.train import rounds  # noqa: PLC0415
  return rounds.round_sources(cfg, vocab, tokenizer)


def _pairs(cfg, vocab: int, tokenizer=None):
  """Tokenized pairs from an ``.npz`` (:func:`jkd.train.rounds.pair_sources`)."""
  from jkd.train import rounds  # noqa: PLC0415
  return rounds.pair_sources(cfg, vocab, tokenizer)


def _domains(cfg, vocab: int, tokenizer=None):
  """DDK's domain mixture (:func:`jkd.train.selection.domain_sources`)."""
  from jkd.train import selection  # noqa: PLC0415
  return selection.domain_sources(cfg, vocab, tokenizer)


_rounds.needs_tokenizer = _pairs.needs_tokenizer = _domains.needs_tokenizer = False
DATA_SOURCES["rounds"] = _rounds
DATA_SOURCES["pairs"] = _pairs
DATA_SOURCES["domains"] = _domains


# ---------------------------------------------------------------------------------------------
# Preference pairs (``preference``, ``synthetic_pairs``; ``data.shape="unpaired"``: KTO).

class UnpairedSource:
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

  def __iter__(self) -> "UnpairedSource":
    return self

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
  from jkd.data.scoring import sequence_layout  # noqa: PLC0415
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


def _synthetic_pairs(cfg, vocab: int, tokenizer=None):
  del tokenizer
  d = cfg.data
  ex = synthetic_pair_examples(int(d.num_examples), int(d.seq_len), vocab, seed=int(d.seed))
  rows = int(d.batch_size) // (2 if d.shape == "unpaired" else 1)
  return _preference_batches(cfg, ArraySource(ex, max(rows, 1), seed=int(d.seed)))


_synthetic_pairs.needs_tokenizer = False


def _preference_dataset(cfg) -> str:
  """The TFDS dataset of ``data.path``: a dataset directory as is, JSONL files built once."""
  d = cfg.data
  paths = _paths(d.path)
  if not paths:
    raise ValueError("data.source='preference' needs data.path: JSONL files of {'prompt',"
                     " 'chosen', 'rejected'} text, or a TFDS preference dataset directory.")
  if len(paths) == 1 and os.path.isdir(os.path.expanduser(paths[0])):
    return os.path.expanduser(paths[0])
  from jkd.data import jsonl  # noqa: PLC0415
  files = jsonl.expand_paths(paths)
  root = os.path.expanduser(d.cache_dir)
  name = _jsonl_cache_name(files, {"shape": "preference", "n_train": len(files)})
  from jkd.data import store  # noqa: PLC0415
  try:
    return store._find(os.path.join(root, name))  # pylint: disable=protected-access
  except FileNotFoundError:
    pass
  try:
    return jsonl.build_jsonl_dataset(files, root, name, shape="preference")
  except FileExistsError:  # Another process built it meanwhile.
    return store._find(os.path.join(root, name))  # pylint: disable=protected-access


def _preference(cfg, vocab: int, tokenizer=None):
  from jkd.data import pipeline, preference, store  # noqa: PLC0415
  d = cfg.data
  path = _preference_dataset(cfg)
  shape = store.read_metadata(path).get("shape")
  if shape not in (None, "preference"):
    raise ValueError(f"{path} is a {shape!r} dataset, not preference pairs ({{'prompt',"
                     " 'chosen', 'rejected'}}); use data.source='jsonl'/'tfds' for it.")
  if tokenizer is None:
    tokenizer = tokenizer_for(cfg)
  if len(tokenizer) > vocab:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has"
                     f" {vocab}: use the teacher's tokenizer.")
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
                                name=f"{os.path.basename(os.path.dirname(store._find(path)))}"
                                     f":{d.split}")
  return _preference_batches(cfg, train)


_preference.needs_tokenizer = False  # Found here: pairs are always text.
DATA_SOURCES["preference"] = _preference
DATA_SOURCES["synthetic_pairs"] = _synthetic_pairs


def _no_tokenizer(cfg):
  raise ValueError("a text dataset needs a teacher with a tokenizer: teacher.source 'random'"
                   " has none; use teacher.source smollm2, gguf or hf, or tokenized data"
                   " (data.shape='tokenized', data.source='npz' or 'synthetic').")


def _gguf_tokenizer(path: str):
  from jkd.models import gguf_io  # noqa: PLC0415
  return gguf_io.load_tokenizer(path)


def _hf_tokenizer(path: str):
  from transformers import AutoTokenizer  # noqa: PLC0415
  return AutoTokenizer.from_pretrained(os.path.expanduser(path))


def _smollm2_tokenizer(cfg):
  from jkd.models import gguf_io  # noqa: PLC0415
  return gguf_io.load_tokenizer(gguf_io.smollm2_gguf_path())


#: ``teacher.source`` -> ``cfg -> tokenizer`` (the teacher's).
TOKENIZER_SOURCES: dict[str, Callable[[Any], Any]] = {
    "smollm2": _smollm2_tokenizer,
    "gguf": lambda cfg: _gguf_tokenizer(cfg.teacher.path),
    "hf": lambda cfg: _hf_tokenizer(cfg.teacher.path),
    "random": _no_tokenizer,
}


def tokenizer_for(cfg):
  """The teacher's ``transformers`` tokenizer (``teacher.source`` smollm2, gguf or hf; or a
  character-level one of ``teacher.model.vocab_size`` ids when ``teacher.tokenizer='char'``).

  Raises:
    ValueError: a ``random`` teacher (no tokenizer) or an unknown source.
  """
  if cfg.teacher.get("tokenizer") == "char":
    from jkd.data.teacher_cache import char_tokenizer  # noqa: PLC0415
    return char_tokenizer(int(cfg.teacher.model.vocab_size))
  if cfg.teacher.get("tokenizer"):
    raise ValueError(f"unknown teacher.tokenizer {cfg.teacher.tokenizer!r}; use '' (the"
                     " teacher's own) or 'char'.")
  if cfg.teacher.source not in TOKENIZER_SOURCES:
    raise ValueError(f"unknown teacher.source {cfg.teacher.source!r}; choose one of"
                     f" {sorted(TOKENIZER_SOURCES)}.")
  return TOKENIZER_SOURCES[cfg.teacher.source](cfg)


def make_sources(cfg, vocab: int, tokenizer=None) -> tuple[Any, Any]:
  """The train source (shuffled) and the eval source (in order, or None) of ``data.source``.

  Args:
    cfg: the training config (its ``data`` and, for text data, ``teacher`` sections).
    vocab: the model's vocabulary size (token ids must be below it).
    tokenizer: the tokenizer of text data (``jsonl``/``tfds``); None: :func:`tokenizer_for`
      when the data is text (not ``data.shape='tokenized'``).

  Returns:
    ``(train, eval or None)``: :class:`ArraySource` (``synthetic``, ``npz``) or
    :class:`jkd.data.DataPipeline` (``jsonl``, ``tfds``).
  """
  if cfg.data.source not in DATA_SOURCES:
    raise ValueError(f"unknown data.source {cfg.data.source!r}; choose one of"
                     f" {sorted(DATA_SOURCES)}.")
  fn = DATA_SOURCES[cfg.data.source]
  if tokenizer is None and fn.needs_tokenizer and _is_text(cfg):
    tokenizer = tokenizer_for(cfg)
  return fn(cfg, vocab, tokenizer)


def _is_text(cfg) -> bool:
  """Whether the configured stored dataset needs tokenising (not ``tokenized`` data)."""
  if cfg.data.shape:
    return cfg.data.shape != "tokenized"
  if cfg.data.source != "tfds":
    return True
  from jkd.data import store  # noqa: PLC0415
  return store.read_metadata(_tfds_path(cfg)).get("shape", "tokenized") != "tokenized"
