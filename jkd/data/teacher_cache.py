"""Offline teacher cache: the teacher's top-k next-token distribution at every position, on disk.

Distilling from a cache instead of a live teacher saves the teacher's forward pass (and its
memory) at every training step. :func:`write_teacher_cache` runs the teacher once over tokenized
examples and writes, next to ``tokens``/``labels``/``loss_mask``, for every position ``t``:

* ``teacher_topk_ids`` ``[T, k]``: the ``k`` most likely next tokens (``uint16`` when the
  vocabulary has at most 65536 ids, else ``int32``);
* ``teacher_topk_logprobs`` ``[T, k]`` ``float16``: their log-probabilities at temperature 1,
  ``log_softmax(logits)[ids]``;
* ``teacher_tail_logprob`` ``[T]`` ``float16``: the log of the mass outside the top k,
  ``log(1 - sum(exp(topk_logprobs)))``, floored at :data:`TAIL_FLOOR` (-30, a mass of about
  1e-13) where it is ~0 (e.g. ``k = vocab``) so that the stored value is always finite.

These are the batch keys ``jkd.losses.sparse_divergence`` and the training step read. The tail
is computed as ``logsumexp(logits outside the top k) - logsumexp(logits)`` (the log1mexp of the
top-k log-mass, but without its float32 cancellation when the top k hold nearly all the mass).

The CLI (``python -m jkd.data.teacher_cache --help``) tokenizes a dataset and caches it::

  python -m jkd.data.teacher_cache --teacher smollm2 --dataset DIR --split train \\
      --seq_len 256 --k 32 --out DIR

Transformed targets, written once (:mod:`jkd.data.cache_targets`; metadata ``calibration`` or
``privacy``, which a training run on the cache reports): ``--calibrate`` (FIRST: the top-k
renormalised and tempered at a temperature fitted on held-out data, docs/methods.md §15) or
``--privacy_epsilon`` (Swing: the full distribution clipped and Gaussian-noised, its noisy top-k
released, docs/methods.md §16). ``--eval_split`` caches a held-out split as ``eval`` too::

  python -m jkd.data.teacher_cache --teacher smollm2 --dataset DIR --seq_len 256 --k 5 \\
      --eval_split eval --calibrate --out DIR --name first_cache

Teachers are named by a model spec (:func:`jkd.data.model_spec.load_model`): ``smollm2``,
``gguf:PATH``, ``hf:DIR`` or ``random:{json of ModelConfig fields, optional "seed"}`` (a random
model with a character tokenizer, for tests and dry runs).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import hashlib
import json
import os
import secrets
from typing import Any, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jkd import errors
from jkd import models
from jkd import runtime
from jkd.data.model_spec import load_model
from jkd.data import arrays as arrays_lib
from jkd.data import cache_targets
from jkd.data import calibration
from jkd.data import privacy as privacy_lib
from jkd.data import store
from jkd.data import examples

PyTree = Any
#: Examples to cache: an iterable of example dicts, or a dict of ``[N, T]`` arrays.
Examples = Iterable[Mapping[str, Any]] | Mapping[str, Any]

#: Stored ``teacher_tail_logprob`` floor: the log tail mass where it is ~0 (or exactly 0).
TAIL_FLOOR = -30.0
#: Fields every cached example holds (in this order); optional inputs are kept when present.
CACHE_FIELDS = ("tokens", "labels", "loss_mask", "teacher_topk_ids", "teacher_topk_logprobs",
                "teacher_tail_logprob")
OPTIONAL_FIELDS = ("attention_mask", "positions", "segment_ids")
CACHE_KIND = "teacher_cache"


# -------------------------------------------------------------------------------------------------
# Teachers


def teacher_fingerprint(params: PyTree, config: models.ModelConfig) -> str:
  """A hex digest of the teacher's config and every parameter's name, dtype, shape and bytes.

  Two teachers with the same fingerprint compute the same function; the caches and corpora
  record it so that data from different teachers is never mixed unknowingly.
  """
  h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape}".encode())
    h.update(hashlib.blake2b(arr.data, digest_size=16).digest())
  return h.hexdigest()[:32]


# -------------------------------------------------------------------------------------------------
# The cache


def default_id_dtype(vocab_size: int) -> np.dtype:
  """``uint16`` when every id fits (``vocab_size <= 65536``), else ``int32``."""
  return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def topk_logprobs(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k ids, their log-probs and the log tail mass of logits (temperature 1).

  The tail is ``logsumexp(logits outside the top k) - logsumexp(logits)``, i.e.
  ``log(1 - sum(exp(topk_logprobs)))`` without the cancellation of forming ``1 - sum`` in float32
  when the top k hold nearly all the mass; it is floored at :data:`TAIL_FLOOR` (also where the
  tail is empty, ``k = vocab``). Banned tokens (``-inf`` logits) are fine.

  Args:
    logits: ``[..., vocab]`` logits (any float dtype; computed in float32).
    k: ids kept, ``1 <= k <= vocab`` (static).

  Returns:
    ``(ids [..., k] int32, logprobs [..., k] float32, tail [...] float32)``, ids in decreasing
    probability.

  >>> ids, lp, tail = topk_logprobs(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), 2)
  >>> ids.tolist(), [round(float(x), 4) for x in jnp.exp(lp)], round(float(jnp.exp(tail)), 4)
  ([0, 1], [0.5, 0.3], 0.2)
  """
  logits = jnp.asarray(logits, jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  top, ids = jax.lax.top_k(logits, k)
  if k < vocab:
    flat = logits.reshape(-1, vocab)
    rows = jnp.arange(flat.shape[0])[:, None]
    rest = flat.at[rows, ids.reshape(-1, k)].set(-jnp.inf).reshape(logits.shape)
    tail = jax.nn.logsumexp(rest, axis=-1) - lse
  else:
    tail = jnp.full(lse.shape, -jnp.inf)
  return ids, top - lse[..., None], jnp.maximum(tail, TAIL_FLOOR)


@functools.partial(jax.jit, static_argnames=("config", "k"))
def teacher_topk(params: PyTree, tokens: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                 config: models.ModelConfig, k: int):
  """The teacher's :func:`topk_logprobs` at every position of a batch (jitted per shape).

  Args:
    params, config: the teacher.
    tokens: ``[B, T]`` int token ids.
    attention_mask, positions, segment_ids: optional ``[B, T]`` model inputs.
    k: ids kept per position, ``1 <= k <= vocab``.

  Returns:
    ``(ids [B, T, k] int32, logprobs [B, T, k] float32, tail [B, T] float32)``.
  """
  logits = models.apply(params, tokens, config=config, attention_mask=attention_mask,
                        positions=positions, segment_ids=segment_ids).logits
  return topk_logprobs(logits, k)


def _rows(examples) -> Iterator[Mapping[str, Any]]:
  """Examples from an iterable of dicts or a dict of ``[N, T]`` arrays."""
  if isinstance(examples, Mapping):
    arrays = {key: np.asarray(v) for key, v in examples.items()}
    n = {key: v.shape[0] for key, v in arrays.items()}
    if len(set(n.values())) != 1:
      raise ValueError(f"every array of the examples needs the same leading size; got {n}.")
    for i in range(next(iter(n.values()))):
      yield {key: v[i] for key, v in arrays.items()}
  else:
    yield from examples


def _check_example(i: int, ex: Mapping[str, Any], seq_len: int | None, optional: tuple,
                   vocab: int) -> dict[str, np.ndarray]:
  missing = [f for f in ("tokens", "labels", "loss_mask") if f not in ex]
  if missing:
    raise ValueError(f"example {i} lacks {missing}: cache examples need tokens, labels and"
                     f" loss_mask (as jkd.data.examples makes them); it has {sorted(ex)}.")
  out = {}
  length, source = seq_len, "the first example's length"
  for f in ("tokens", "labels", "loss_mask") + optional:
    if f not in ex:
      raise ValueError(f"example {i} lacks {f!r}, which the first example has; every example"
                       " needs the same fields.")
    v = np.asarray(ex[f])
    if v.ndim != 1 or (length is not None and v.shape[0] != length):
      raise ValueError(f"example {i}: {f} has shape {list(v.shape)}, expected [{length}]"
                       f" ({source}); pad every example to one length"
                       " (jkd.data.examples.pad_example).")
    if length is None:  # the first example: its tokens set the length
      length, source = v.shape[0], "the length of its tokens"
    out[f] = v.astype(bool) if f == "loss_mask" else v.astype(np.int32)
  bad = (out["tokens"] < 0) | (out["tokens"] >= vocab)
  if bad.any():
    raise ValueError(f"example {i}: token id {int(out['tokens'][bad][0])} is outside the"
                     f" teacher's vocabulary [0, {vocab}); was it tokenized for another model?")
  return out


def _teacher_targets(params, config, k: int):
  """``targets(inputs, index) -> (ids, logprobs, tail)``: :func:`teacher_topk` of a batch."""
  def targets(inputs, index):
    del index
    return teacher_topk(params, inputs["tokens"], inputs.get("attention_mask"),
                        inputs.get("positions"), inputs.get("segment_ids"), config=config, k=k)
  return targets


def _batches(rows: Iterator, first: dict, optional: tuple, *, vocab: int, batch_size: int):
  """Lists of at most ``batch_size`` checked examples of the same length as ``first`` (example
  0; ``rows`` holds the others)."""
  seq_len = first["tokens"].shape[0]
  batch = [first]
  for i, ex in enumerate(rows, start=1):
    batch.append(_check_example(i, ex, seq_len, optional, vocab))
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def _run_targets(targets, batch: list, optional: tuple, batch_size: int, index: int):
  """``targets`` of a list of examples padded to ``batch_size`` (one shape: one compilation),
  the padding rows dropped again."""
  n = len(batch)
  padded = batch + [batch[-1]] * (batch_size - n)
  inputs = {f: np.stack([ex[f] for ex in padded]) for f in ("tokens",) + optional}
  ids, lp, tail = targets(inputs, index)
  return np.asarray(ids)[:n], np.asarray(lp, np.float32)[:n], np.asarray(tail, np.float32)[:n]


def _cached_examples(rows: Iterator, first: dict, optional: tuple, *, targets, vocab: int,
                     batch_size: int, id_dtype, progress: bool, total: int | None, stats: dict,
                     index: int = 0):
  """Yields the cached examples, computing ``targets`` on batches of ``batch_size``; batch
  ``j`` is ``targets``' call ``index + j``."""
  bar = tqdm(total=total, desc="teacher cache", unit="ex", disable=not progress)
  for j, batch in enumerate(_batches(rows, first, optional, vocab=vocab,
                                     batch_size=batch_size)):
    ids, lp, tail = _run_targets(targets, batch, optional, batch_size, index + j)
    ids, lp, tail = ids.astype(id_dtype), lp.astype(np.float16), tail.astype(np.float16)
    for i, ex in enumerate(batch):
      yield dict(ex, teacher_topk_ids=ids[i], teacher_topk_logprobs=lp[i],
                 teacher_tail_logprob=tail[i])
    stats["count"] += len(batch)
    bar.update(len(batch))
  bar.close()


def _array_record_bytes(path: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.array_record*")))


def _update_metadata(path: str, updates: Mapping[str, Any]) -> None:
  """Adds ``updates`` to the dataset's ``metadata.json`` (atomic replace)."""
  file = os.path.join(path, "metadata.json")
  with open(file) as f:
    meta = json.load(f)
  meta.update(updates)
  with open(file + ".tmp", "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  os.replace(file + ".tmp", file)


def _check_cache_options(vocab: int, k, batch_size, id_dtype) -> np.dtype:
  """Validates ``k`` and ``batch_size``; returns the id dtype (default :func:`default_id_dtype`),
  checked to hold every id of the vocabulary."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= vocab:
    raise ValueError(f"k must be an int in [1, vocab={vocab}], got {k!r}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  id_dtype = default_id_dtype(vocab) if id_dtype is None else np.dtype(id_dtype)
  if not np.issubdtype(id_dtype, np.integer) or np.iinfo(id_dtype).max < vocab - 1:
    raise ValueError(f"id_dtype {id_dtype} cannot hold token ids up to {vocab - 1}; use"
                     f" {default_id_dtype(vocab)} (the default) or int32.")
  return id_dtype


def _cache_features(seq_len: int, k: int, id_dtype: np.dtype, optional: tuple) -> dict[str, Any]:
  """The cache's TFDS features: the example's fields and the teacher's top-k ones."""
  features = {"tokens": store.tensor_feature(np.int32, (seq_len,)),
              "labels": store.tensor_feature(np.int32, (seq_len,)),
              "loss_mask": store.tensor_feature(np.bool_, (seq_len,)),
              "teacher_topk_ids": store.tensor_feature(id_dtype, (seq_len, k)),
              "teacher_topk_logprobs": store.tensor_feature(np.float16, (seq_len, k)),
              "teacher_tail_logprob": store.tensor_feature(np.float16, (seq_len,))}
  features.update({f: store.tensor_feature(np.int32, (seq_len,)) for f in optional})
  return features


def _record_sizes(path: str, features: Mapping[str, Any], count: int, seq_len: int) -> None:
  """Adds ``count``, ``bytes_per_token`` and ``payload_bytes_per_token`` to the metadata."""
  tokens = count * seq_len
  payload = sum(np.dtype(f.np_dtype).itemsize * int(np.prod(f.shape[1:]))
                for f in features.values())
  _update_metadata(path, {"count": count,
                          "bytes_per_token": _array_record_bytes(path) / max(tokens, 1),
                          "payload_bytes_per_token": payload})


def _first_example(examples, vocab: int, what: str):
  """``(rows iterator, first checked example, optional fields, total or None)``."""
  if isinstance(examples, Mapping):
    total = len(np.asarray(next(iter(examples.values()))))
  else:
    total = len(examples) if hasattr(examples, "__len__") else None
  rows = iter(_rows(examples))
  try:
    first_raw = next(rows)
  except StopIteration:
    raise ValueError(f"{what} is empty: nothing to cache.") from None
  optional = tuple(f for f in OPTIONAL_FIELDS if f in first_raw)
  return rows, _check_example(0, first_raw, None, optional, vocab), optional, total


def fit_cache_temperature(examples, *, params: PyTree, config: models.ModelConfig, k: int,
                          batch_size: int = 8, criterion: str = "ece",
                          **options) -> calibration.TemperatureFit:
  """FIRST's temperature for a teacher's top-``k``, fitted on held-out examples with labels.

  The teacher's top-k log-probabilities (temperature 1) at every counted position of
  ``examples`` (``labels != -100`` and ``loss_mask``) go to
  :func:`jkd.data.calibration.fit_temperature`.

  Args:
    examples: held-out examples, as :func:`write_teacher_cache` takes them (not the cached ones).
    params, config: the teacher.
    k: the cache's top-k.
    batch_size: examples per teacher call.
    criterion, **options: :func:`jkd.data.calibration.fit_temperature`'s.

  Returns:
    The :class:`jkd.data.calibration.TemperatureFit`.
  """
  vocab = config.vocab_size
  _check_cache_options(vocab, k, batch_size, None)
  rows, first, optional, _ = _first_example(examples, vocab, "the held-out examples")
  targets = _teacher_targets(params, config, int(k))
  parts = collections.defaultdict(list)
  for j, batch in enumerate(_batches(rows, first, optional, vocab=vocab,
                                     batch_size=int(batch_size))):
    ids, lp, _ = _run_targets(targets, batch, optional, int(batch_size), j)
    parts["ids"].append(ids)
    parts["lp"].append(lp)
    parts["labels"].append(np.stack([ex["labels"] for ex in batch]))
    parts["mask"].append(np.stack([ex["loss_mask"] for ex in batch]))
  cat = {key: np.concatenate(v) for key, v in parts.items()}
  return calibration.fit_temperature(cat["lp"], cat["ids"], cat["labels"], where=cat["mask"],
                                     criterion=criterion, **options)


def write_teacher_cache(examples: Examples, out_dir: str,
                        *, params: PyTree, config: models.ModelConfig, k: int = 32,
                        batch_size: int = 8, name: str = "teacher_cache", id_dtype=None,
                        teacher: str = "", split: str = "train", progress: bool = True,
                        metadata: Mapping[str, Any] | None = None,
                        eval_examples: Examples | None = None,
                        calibrate_on: Examples | None = None,
                        calibration_criterion: str = "ece",
                        privacy: privacy_lib.PrivacySpec | None = None) -> str:
  """Runs the teacher over tokenized examples and writes its top-k as a TFDS dataset.

  The examples stream through (memory holds one batch); the output keeps their order and count.
  The last batch is padded to ``batch_size`` so every call of the jitted teacher has one shape.

  Two optional transforms of the released targets (one at a time):

  * ``calibrate_on`` (FIRST, docs/methods.md §15): held-out examples on which a temperature is
    fitted (:func:`fit_cache_temperature`); the cached top-k is then renormalised over the k
    ids at that temperature and the tail left empty (``TAIL_FLOOR``).
  * ``privacy`` (Swing, docs/methods.md §16): each position's full distribution is clipped and
    noised by the Gaussian mechanism of :class:`jkd.data.privacy.PrivacySpec` (``sigma`` from
    its ``(epsilon, delta)`` for sequences of this length), and the noisy top-k released.

  Args:
    examples: an iterable of ``{"tokens": [T] int, "labels": [T] int, "loss_mask": [T] bool}``
      (all padded to one ``T``; optional ``attention_mask``, ``positions``, ``segment_ids`` are
      fed to the teacher and stored too), or a dict of ``[N, T]`` arrays with those keys.
    out_dir: the TFDS root; the dataset goes to ``out_dir/name/1.0.0``.
    params, config: the teacher.
    k: ids kept per position (``1 <= k <= vocab``).
    batch_size: examples per teacher call.
    name: the dataset name.
    id_dtype: dtype of the stored ids (default :func:`default_id_dtype`).
    teacher: a description of the teacher for the metadata (e.g. its spec).
    split: the split name written.
    progress: show a tqdm bar.
    metadata: more facts to store with the dataset.
    eval_examples: optional examples like ``examples`` (same length and fields), cached the
      same way as the split ``"eval"`` (training evaluates the student on it).
    calibrate_on: optional held-out examples (FIRST's temperature; see above).
    calibration_criterion: ``"ece"`` or ``"nll"`` (:func:`jkd.data.calibration.fit_temperature`).
    privacy: optional :class:`jkd.data.privacy.PrivacySpec` (Swing; see above).

  Returns:
    The dataset directory. Its metadata (:func:`jkd.data.read_metadata`) holds ``kind``
    (``"teacher_cache"``), ``k``, ``vocab``, ``seq_len``, ``count``, ``teacher``,
    ``teacher_fingerprint``, ``teacher_config``, ``id_dtype``, ``tail_floor``, ``temperature``
    (of the stored log-probabilities), ``bytes_per_token`` (array_record bytes on disk / cached
    tokens: ArrayRecord compresses records and its files grow in 64 KiB steps, so this
    overstates small caches) and ``payload_bytes_per_token`` (the raw size of one position's
    fields, e.g. 139 for k=32 with uint16 ids), ``splits``; ``eval_count`` with ``eval_examples``;
    ``calibration`` (:meth:`jkd.data.calibration.TemperatureFit.as_metadata`) with
    ``calibrate_on``; ``privacy`` (:meth:`jkd.data.privacy.PrivacySpec.plan`) with ``privacy``.
  """
  vocab = config.vocab_size
  id_dtype = _check_cache_options(vocab, k, batch_size, id_dtype)
  if calibrate_on is not None and privacy is not None:
    raise ValueError("write_teacher_cache() takes calibrate_on (FIRST) or privacy (Swing), not"
                     " both: a temperature fitted on held-out teacher outputs would be released"
                     " without noise. Write one cache per method.")
  if privacy is not None and not isinstance(privacy, privacy_lib.PrivacySpec):
    raise ValueError(f"privacy must be a jkd.data.privacy.PrivacySpec (got"
                     f" {type(privacy).__name__}).")
  if calibration_criterion not in calibration.CRITERIA:
    raise ValueError(f"calibration_criterion must be one of {list(calibration.CRITERIA)} (got"
                     f" {calibration_criterion!r}).")
  rows, first, optional, total = _first_example(examples, vocab, "examples")
  seq_len = int(first["tokens"].shape[0])
  features = _cache_features(seq_len, k, id_dtype, optional)
  meta = {"kind": CACHE_KIND, "k": int(k), "vocab": int(vocab), "seq_len": seq_len,
          "teacher": teacher, "teacher_fingerprint": teacher_fingerprint(params, config),
          "teacher_config": dataclasses.asdict(config), "id_dtype": id_dtype.name,
          "logprob_dtype": "float16", "tail_floor": TAIL_FLOOR, "temperature": 1.0,
          "fields": list(CACHE_FIELDS + optional),
          "splits": sorted({split} | ({"eval"} if eval_examples is not None else set())),
          **dict(metadata or {})}
  targets = _teacher_targets(params, config, int(k))
  if calibrate_on is not None:
    fit = fit_cache_temperature(calibrate_on, params=params, config=config, k=int(k),
                                batch_size=batch_size, criterion=calibration_criterion)
    targets = cache_targets.calibrated_targets(targets, fit.temperature, floor=TAIL_FLOOR)
    meta.update(temperature=fit.temperature, calibration=fit.as_metadata())
  if privacy is not None:
    plan = privacy.plan(seq_len)
    seed = secrets.randbits(62) if privacy.seed is None else int(privacy.seed)
    targets = cache_targets.private_targets(params, config, k=int(k), sigma=plan["sigma"],
                                            clip=privacy.clip, seed=seed, floor=TAIL_FLOOR)
    meta["privacy"] = plan
  common = dict(targets=targets, vocab=vocab, batch_size=int(batch_size), id_dtype=id_dtype,
                progress=progress)
  stats = {"count": 0}
  splits = {split: _cached_examples(rows, first, optional, total=total, stats=stats, **common)}
  eval_stats = {"count": 0}
  if eval_examples is not None:
    if split == "eval":
      raise ValueError("split 'eval' is taken by eval_examples; name the cached split"
                       " otherwise (e.g. 'train').")
    eval_rows, eval_first, eval_optional, eval_total = _first_example(
        eval_examples, vocab, "eval_examples")
    if eval_optional != optional or eval_first["tokens"].shape[0] != seq_len:
      raise ValueError(f"eval_examples must have the examples' length {seq_len} and fields"
                       f" {list(CACHE_FIELDS[:3] + optional)}; they have length"
                       f" {eval_first['tokens'].shape[0]} and"
                       f" {list(CACHE_FIELDS[:3] + eval_optional)}.")
    # Batch indices after any training batch: the noise of the two splits never repeats.
    splits["eval"] = _cached_examples(eval_rows, eval_first, optional, total=eval_total,
                                      stats=eval_stats, index=1 << 30, **common)
  path = store.write_dataset(out_dir, name, features, splits, metadata=meta,
                             description=f"teacher top-{k} cache of {teacher or 'a teacher'}")
  _record_sizes(path, features, stats["count"] + eval_stats["count"], seq_len)
  if eval_examples is not None:
    _update_metadata(path, {"count": stats["count"], "eval_count": eval_stats["count"]})
  return path


def check_cache(path: str, *, vocab: int, k: int | None = None,
                split: str | None = None) -> dict[str, Any]:
  """Validates a teacher cache before training on it.

  Args:
    path: the dataset directory (or its ``root/name``).
    vocab: the student's vocabulary size; must equal the teacher's.
    k: the top-k size the training expects (``None``: any).
    split: a split that must exist and hold every cache field (``None``: not checked).

  Returns:
    The cache metadata.

  Raises:
    ValueError: not a teacher cache, another vocabulary or ``k``, or a missing split / field.
  """
  meta = store.read_metadata(path)
  if meta.get("kind") != CACHE_KIND:
    raise ValueError(f"{path!r} is not a teacher cache (metadata kind {meta.get('kind')!r});"
                     " write one with jkd.data.write_teacher_cache or python -m"
                     " jkd.data.teacher_cache.")
  if int(meta["vocab"]) != int(vocab):
    raise ValueError(f"teacher cache {path!r} has teacher vocab {meta['vocab']} but the student"
                     f" has vocab {vocab}: the cached ids index another vocabulary. Use a student"
                     " with the teacher's tokenizer, or rebuild the cache with a matching"
                     " teacher.")
  if k is not None and int(meta["k"]) != int(k):
    raise ValueError(f"teacher cache {path!r} holds top-{meta['k']} but k={k} was asked; set k"
                     f" to {meta['k']} or rebuild the cache with --k {k}.")
  if split is not None:
    src = store.open_split(path, split)
    have = set(src[0]) if len(src) else set()
    missing = [f for f in CACHE_FIELDS if f not in have]
    if missing:
      raise ValueError(f"teacher cache {path!r} split {split!r} lacks fields {missing}.")
  return meta


# -------------------------------------------------------------------------------------------------
# CLI


def _npz_examples(path: str, seq_len: int | None, vocab: int) -> dict[str, np.ndarray]:
  arrays = arrays_lib.read_npz(path, ("tokens", "labels", "loss_mask"),
                               what="an .npz for the teacher cache")
  t = arrays_lib.check_token_arrays(arrays, path, vocab=vocab)[1]
  if seq_len is not None and t != seq_len:
    raise ValueError(f"{path}: tokens have length {t} but --seq_len is {seq_len}; pass"
                     f" --seq_len {t} or re-tokenize.")
  return {key: v for key, v in arrays.items() if key in CACHE_FIELDS[:3] + OPTIONAL_FIELDS}


def _dataset_examples(path: str, split: str, tokenizer, *, seq_len: int, vocab_size: int,
                      shape: str | None, chat_template: bool, counts) -> Iterator[dict]:
  """Tokenized, right-padded examples of a jkd text dataset (via :mod:`jkd.data.examples`)."""
  shape = shape or store.read_metadata(path).get("shape")
  if shape not in ("text", "prompt_completion", "chat"):
    raise ValueError(f"dataset {path!r} has shape {shape!r}; a teacher cache is built from a"
                     " 'text', 'prompt_completion' or 'chat' dataset (pass --shape if its"
                     " metadata lacks one).")
  src = store.open_split(path, split)
  for i in range(len(src)):
    ex = examples.tokenize_example(src[i], tokenizer, shape=shape, seq_len=seq_len,
                                   chat_template=chat_template, vocab_size=vocab_size,
                                   name=f"{split} example {i}", counts=counts)
    if ex is not None:  # nothing left to train after truncation: skipped, counted
      yield examples.pad_example(ex, seq_len)


def main(argv: list[str] | None = None) -> str:
  """``python -m jkd.data.teacher_cache``: see the module docstring and ``--help``."""
  p = argparse.ArgumentParser(prog="python -m jkd.data.teacher_cache",
                              description="Cache a teacher's top-k log-probs over a dataset.")
  p.add_argument("--teacher", required=True,
                 help="smollm2 | gguf:PATH | hf:DIR | random:{json ModelConfig fields}")
  p.add_argument("--dataset", required=True,
                 help="a jkd/TFDS text dataset directory, or an .npz of [N, T] tokens, labels,"
                      " loss_mask")
  p.add_argument("--split", default="train")
  p.add_argument("--seq_len", type=int, default=None,
                 help="pad/truncate length (required for a text dataset; checked for .npz)")
  p.add_argument("--k", type=int, default=32)
  p.add_argument("--out", required=True, help="TFDS root the cache is written under")
  p.add_argument("--name", default="teacher_cache")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--limit", type=int, default=None, help="cache only the first N examples")
  p.add_argument("--shape", default=None, choices=("text", "prompt_completion", "chat"),
                 help="the text dataset's shape (default: from its metadata)")
  p.add_argument("--no_chat_template", action="store_true",
                 help="tokenize prompt/completion as plain text")
  p.add_argument("--no_progress", action="store_true")
  cache_targets.add_flags(p)
  args = p.parse_args(argv)
  if not args.dataset.endswith(".npz") and args.seq_len is None:
    p.error("--seq_len is required to tokenize a text dataset.")
  teacher = load_model(args.teacher)
  counts: dict[str, int] = collections.Counter()

  def load(path: str, split: str, limit: int | None, count=None) -> Any:
    if path.endswith(".npz"):
      arrays = _npz_examples(path, args.seq_len, teacher.config.vocab_size)
      return arrays if limit is None else {key: v[:limit] for key, v in arrays.items()}
    rows = _dataset_examples(path, split, teacher.tokenizer, seq_len=args.seq_len,
                             vocab_size=teacher.config.vocab_size, shape=args.shape,
                             chat_template=not args.no_chat_template,
                             counts=collections.Counter() if count is None else count)
    if limit is not None:
      import itertools  # noqa: PLC0415
      rows = itertools.islice(rows, limit)
    return rows

  options = cache_targets.flag_options(args, load, p.error)
  examples = load(args.dataset, args.split, args.limit, counts)
  path = write_teacher_cache(examples, args.out, params=teacher.params, config=teacher.config,
                             k=args.k, batch_size=args.batch_size, name=args.name,
                             teacher=args.teacher, split=args.split,
                             progress=not args.no_progress,
                             metadata={"source": os.path.abspath(args.dataset),
                                       "source_split": args.split}, **options)
  # Known only once the examples have streamed through.
  _update_metadata(path, {"skipped_no_target": counts.get("no_target", 0),
                          "truncated": counts.get("truncated", 0)})
  meta = store.read_metadata(path)
  print(f"wrote {meta['count']} examples x {meta['seq_len']} tokens (top-{meta['k']}) to {path};"
        f" {meta['bytes_per_token']:.1f} bytes per token")
  for line in cache_targets.facts_lines(meta):
    print(line)
  return path


if __name__ == "__main__":
  runtime.prepare_process()
  errors.run_main(main)
