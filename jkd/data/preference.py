"""Preference pairs: tokenized from text, or sampled and ranked; cached reference log-probs.

Three steps feed DPO-style training (:mod:`jkd.losses.preference_objective`):

1. :func:`tokenize_preference` / :func:`tokenize_pairs` turn text pairs ``{"prompt", "chosen",
   "rejected"}`` into the engine's arrays ``chosen_tokens``, ``chosen_labels``,
   ``rejected_tokens``, ``rejected_labels`` (``[seq_len]`` int32, right-padded, labels are the
   next tokens with ``-100`` on prompt and padding).
2. :func:`make_pairs` is Distillation-DPO's data loop: sample ``n`` completions per prompt from
   the policy (the student) with :func:`jkd.sampling.generate`, score them with a scorer from
   :data:`SCORERS` (e.g. the teacher's mean log-likelihood), keep the best as chosen and the
   worst as rejected. Call it once per round with ``round_index`` (fresh samples each round);
   :func:`write_pairs` stores the pairs as a TFDS dataset (:mod:`jkd.data.store`).
3. :func:`reference_logprobs` computes the reference model's summed completion log-probs once
   and caches them under ``cache_dir/<fingerprint>/``; the fingerprint hashes the model config,
   every parameter's bytes and the tokenized data, so any change recomputes.

CLI (``python -m jkd.data.preference make --help``)::

  python -m jkd.data.preference make --policy smollm2 --scorer teacher_logprob \\
      --teacher smollm2 --prompts prompts.jsonl --n 4 --out /tmp/pairs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import zipfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from jkd import errors
from jkd import runtime
from jkd.data import scoring
from jkd.data import store
from jkd.data import corpus
from jkd.data import model_spec
from jkd.data.corpus import encode_prompt
from jkd.sampling import generate
from jkd.data.scoring import (  # noqa: F401  (re-exported)
    IGNORE_INDEX,
    SCORERS,
    Candidate,
    Scorer,
    make_scorer,
    register_scorer,
)
from jkd.models.config import ModelConfig

#: Version of the reference log-prob cache format (part of every fingerprint).
CACHE_FORMAT_VERSION = 1
CACHE_FILE = "reference_logprobs.npz"
TOKEN_FIELDS = ("chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels")
_OVERFLOW = ("truncate", "error", "drop")
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# 1. Tokenized pairs


def _text(example: Mapping[str, Any], key: str) -> str:
  if not isinstance(example, Mapping) or key not in example:
    have = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    raise ValueError(f"a preference example needs the text fields 'prompt', 'chosen' and"
                     f" 'rejected'; {key!r} is missing (got {have}).")
  value = example[key]
  if isinstance(value, (bytes, np.bytes_)):
    value = bytes(value).decode("utf-8")
  if not isinstance(value, str):
    raise ValueError(f"field {key!r} must be text, got {type(value).__name__}.")
  return value


def _eos_id(tokenizer) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; completions must end with EOS. Set"
                     " tokenizer.eos_token (e.g. the chat template's end-of-turn token).")
  return int(eos)


def tokenize_preference(example: Mapping[str, Any], tokenizer, *, seq_len: int,
                        chat_template: bool = True, overflow: str = "truncate",
                        pad_id: int | None = None) -> dict[str, np.ndarray] | None:
  """One text pair -> the engine's tokenized pair (completion-only labels).

  Each sequence is ``prompt + completion + [EOS]`` right-padded to ``seq_len``; the prompt (the
  same ids in both) goes through the chat template when ``chat_template``. ``labels[t] =
  tokens[t + 1]`` where ``t + 1`` is a completion token, else ``-100``.

  Args:
    example: ``{"prompt", "chosen", "rejected"}`` text (``bytes`` are decoded as UTF-8).
    tokenizer: a ``transformers`` tokenizer with an ``eos_token_id``.
    seq_len: length of every output array.
    chat_template: see :func:`encode_prompt`.
    overflow: a pair longer than ``seq_len``: ``"truncate"`` cuts the completions (the prompt is
      kept whole; EOS may be cut), ``"error"`` raises, ``"drop"`` returns ``None``.
    pad_id: the padding token (default: the tokenizer's pad token, else EOS); never a label.

  Returns:
    ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}``, each
    ``[seq_len]`` int32 (or ``None`` for a dropped pair).

  Raises:
    ValueError: a missing or empty field, ``chosen == rejected``, a prompt that leaves no room
      for a completion token, or an overflowing pair with ``overflow="error"``.
  """
  if overflow not in _OVERFLOW:
    raise ValueError(f"overflow must be one of {list(_OVERFLOW)}, got {overflow!r}.")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}.")
  prompt, chosen, rejected = (_text(example, k) for k in ("prompt", "chosen", "rejected"))
  for name, value in (("chosen", chosen), ("rejected", rejected)):
    if not value.strip():
      raise ValueError(f"the {name} completion is empty; drop the pair (a preference needs two"
                       " non-empty completions).")
  if chosen == rejected:
    raise ValueError("chosen == rejected: the pair carries no preference signal; drop it.")
  eos = _eos_id(tokenizer)
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_token_id", None)
  pad = eos if pad_id is None else int(pad_id)
  p = encode_prompt(tokenizer, prompt, chat_template=chat_template)
  if len(p) + 1 > seq_len:
    raise ValueError(f"the prompt is {len(p)} tokens but seq_len is {seq_len}: no room for the"
                     " completion. Raise seq_len or shorten the prompt.")
  comps = [[int(i) for i in tokenizer(c, add_special_tokens=False)["input_ids"]] + [eos]
           for c in (chosen, rejected)]
  room = seq_len - len(p)
  if max(len(c) for c in comps) > room:
    if overflow == "error":
      raise ValueError(f"the pair needs {len(p) + max(len(c) for c in comps)} tokens (prompt"
                       f" {len(p)}, chosen {len(comps[0])}, rejected {len(comps[1])} with EOS)"
                       f" > seq_len {seq_len}; raise seq_len or use overflow='truncate'/'drop'.")
    if overflow == "drop":
      return None
    comps = [c[:room] for c in comps]
    if comps[0] == comps[1]:
      raise ValueError(f"chosen and rejected are identical in their first {room} tokens, all"
                       f" that fits in seq_len {seq_len} after the {len(p)}-token prompt: the"
                       " truncated pair carries no preference signal. Raise seq_len or drop it.")
  out = {}
  for name, comp in zip(("chosen", "rejected"), comps):
    out[f"{name}_tokens"], out[f"{name}_labels"] = scoring.sequence_layout(p, comp, seq_len, pad)
  return out


def tokenize_pairs(examples: Iterable[Mapping[str, Any]], tokenizer, *, seq_len: int,
                   chat_template: bool = True, overflow: str = "truncate",
                   pad_id: int | None = None, source: str | None = None) -> dict[str, np.ndarray]:
  """:func:`tokenize_preference` over many pairs, stacked.

  Args:
    examples: text pairs (e.g. JSONL records or :func:`read_pairs`).
    tokenizer, seq_len, chat_template, overflow, pad_id: see :func:`tokenize_preference`.
    source: a file name for error messages (``source:line``, counting examples from line 1).

  Returns:
    The four :data:`TOKEN_FIELDS` as ``[N, seq_len]`` int32 arrays, and ``example_index``
    ``[N]`` int64: the position of each kept pair in ``examples`` (pairs may be dropped).
  """
  rows, index = [], []
  for i, example in enumerate(examples):
    try:
      row = tokenize_preference(example, tokenizer, seq_len=seq_len, chat_template=chat_template,
                                overflow=overflow, pad_id=pad_id)
    except ValueError as e:
      where = f"{source}:{i + 1}" if source else f"example {i}"
      raise ValueError(f"{where}: {e}") from None
    if row is not None:
      rows.append(row)
      index.append(i)
  if not rows:
    raise ValueError(f"no preference pair to tokenize{f' in {source}' if source else ''}"
                     " (empty input, or every pair was dropped).")
  out = {k: np.stack([r[k] for r in rows]) for k in TOKEN_FIELDS}
  out["example_index"] = np.asarray(index, np.int64)
  return out


# ------------------------------------------------------------------------------------------------
# 2. Pairs by sampling and ranking


class Pairs(list):
  """The list of pairs :func:`make_pairs` returns, with what it skipped.

  Attributes:
    skipped: indices of the prompts without a pair (all samples scored equal, or fewer than
      two non-empty samples).
    num_prompts: number of prompts given.
  """
  skipped: list[int]
  num_prompts: int


def _prompt_records(prompts, tokenizer, decode, chat_template):
  """``(record, text, ids)`` per prompt."""
  out = []
  for i, p in enumerate(prompts):
    record = dict(p) if isinstance(p, Mapping) else {"prompt": p}
    if "prompt" not in record:
      raise ValueError(f"prompt record {i} has no 'prompt' field (got {sorted(record)}).")
    value = record["prompt"]
    if isinstance(value, str):
      if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass tokenizer=... (or token-id"
                         " prompts with a decode callable).")
      ids = np.asarray(encode_prompt(tokenizer, value, chat_template=chat_template), np.int32)
      text = value
    else:
      ids = np.asarray(value)
      if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt {i} must be text or a non-empty list of token ids.")
      text = decode(ids.tolist())
    out.append((record, text, ids.astype(np.int32)))
  if not out:
    raise ValueError("no prompts given.")
  return out


def _sample_candidates(records, n: int, *, params, config: ModelConfig, key: jax.Array,
                       batch_size: int, max_new_tokens: int, temperature: float, top_p: float,
                       eos_id: int | None, decode: Callable[[list[int]], str]) -> list[Candidate]:
  """``n`` sampled completions per prompt, in prompt order (``n`` consecutive per prompt).

  The ``len(records) * n`` sequences go through :func:`generate` ``batch_size`` at a time, batch
  ``b`` with the key ``fold_in(key, b)``; a completion's text drops its final ``eos_id``.
  """
  rows = [(i, j) for i in range(len(records)) for j in range(n)]
  cands: list[Candidate] = []
  for b, start in enumerate(range(0, len(rows), batch_size)):
    chunk = rows[start:start + batch_size]
    out = generate(params, [records[i][2] for i, _ in chunk], config=config,
                   key=jax.random.fold_in(key, b), max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, eos_id=eos_id)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for r, (i, _) in enumerate(chunk):
      ids = tokens[r, :lengths[r]]
      text_ids = ids[:-1] if eos_id is not None and ids.size and ids[-1] == eos_id else ids
      record, text, prompt_ids = records[i]
      cands.append(Candidate(text, prompt_ids, decode(text_ids.tolist()), ids, record))
  return cands


def _scores(scorer: Scorer, cands: Sequence[Candidate]) -> np.ndarray:
  """The scorer's ``[len(cands)]`` float64 scores, checked to be one finite score each."""
  scores = np.asarray(scorer(cands), np.float64)
  if scores.shape != (len(cands),) or not np.isfinite(scores).all():
    raise ValueError(f"the scorer must return {len(cands)} finite scores, got shape"
                     f" {list(scores.shape)} with {int((~np.isfinite(scores)).sum())} non-finite.")
  return scores


def _rank_pairs(records, cands: Sequence[Candidate], scores: np.ndarray, n: int) -> Pairs:
  """Pairs each prompt's best-scored non-empty completion with its worst (:class:`Pairs`)."""
  pairs = Pairs()
  pairs.skipped, pairs.num_prompts = [], len(records)
  for i, (record, text, _) in enumerate(records):
    group = [(scores[i * n + j], cands[i * n + j].completion) for j in range(n)
             if cands[i * n + j].completion.strip()]
    if len(group) < 2:
      pairs.skipped.append(i)
      continue
    best = max(range(len(group)), key=lambda k: group[k][0])
    worst = min(range(len(group)), key=lambda k: group[k][0])
    if group[best][0] == group[worst][0] or group[best][1] == group[worst][1]:
      pairs.skipped.append(i)
      continue
    pairs.append({"prompt": text, "chosen": group[best][1], "rejected": group[worst][1],
                  "chosen_score": float(group[best][0]),
                  "rejected_score": float(group[worst][0]),
                  "domain": str(record.get("domain", ""))})
  return pairs


def make_pairs(prompts: Sequence[Any], *, policy: tuple[Any, ModelConfig], tokenizer=None,
               scorer: str | Scorer, scorer_options: Mapping[str, Any] | None = None,
               n: int = 4, max_new_tokens: int = 64, temperature: float = 1.0,
               top_p: float = 1.0, seed: int = 0, round_index: int = 0, batch_size: int = 8,
               chat_template: bool = True, decode: Callable[[list[int]], str] | None = None,
               eos_id: int | None = None) -> Pairs:
  """Samples ``n`` completions per prompt from the policy and pairs the best with the worst.

  Distillation-DPO's data step: the student's own samples, ranked by a non-differentiable
  scorer (e.g. the teacher's log-likelihood). Sampling uses the key
  ``fold_in(fold_in(key(seed), round_index), batch)``: the same arguments give the same pairs,
  and each round (``round_index`` 0, 1, ...) draws fresh samples.

  Args:
    prompts: text prompts, token-id lists, or records ``{"prompt": text or ids, "answer": ...,
      "domain": ...}`` (other fields are kept for the scorer, e.g. ``exact_match``).
    policy: ``(params, config)`` of the model that samples (the student).
    tokenizer: encodes text prompts (:func:`encode_prompt`), decodes completions, gives EOS.
    scorer: a :data:`SCORERS` name (built with ``scorer_options``) or a :data:`Scorer`.
    scorer_options: options of a named scorer (``teacher_logprob``: ``params``, ``config``).
    n: samples per prompt (>= 2).
    max_new_tokens, temperature, top_p: sampling options (:func:`jkd.sampling.generate`).
    seed, round_index: randomness (see above).
    batch_size: sequences per ``generate`` call.
    chat_template: text prompts go through the chat template (as :func:`tokenize_preference`).
    decode: ``ids -> text`` instead of the tokenizer's (e.g. for token-id prompts in tests).
    eos_id: the stop token (default: the tokenizer's EOS; ``None`` without a tokenizer).

  Returns:
    :class:`Pairs`: a list of ``{"prompt", "chosen", "rejected", "chosen_score",
    "rejected_score", "domain"}`` in prompt order, with ``.skipped`` prompt indices.
  """
  params, config = policy
  if isinstance(n, bool) or not isinstance(n, int) or n < 2:
    raise ValueError(f"n must be an int >= 2 (samples per prompt), got {n!r}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  if decode is None:
    if tokenizer is None:
      raise ValueError("pass a tokenizer, or a decode callable (ids -> text).")
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
  if eos_id is None and tokenizer is not None:
    eos_id = _eos_id(tokenizer)
  if isinstance(scorer, str):
    scorer = make_scorer(scorer, **dict(scorer_options or {}))
  elif scorer_options:
    raise ValueError("scorer_options are for a scorer given by name.")
  records = _prompt_records(prompts, tokenizer, decode, chat_template)
  key = jax.random.fold_in(jax.random.key(seed), round_index)
  cands = _sample_candidates(records, n, params=params, config=config, key=key,
                             batch_size=batch_size, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, eos_id=eos_id, decode=decode)
  pairs = _rank_pairs(records, cands, _scores(scorer, cands), n)
  if pairs.skipped:
    _log.info("make_pairs: %d of %d prompts skipped (equal scores or empty samples)",
              len(pairs.skipped), len(records))
  return pairs


def _pair_features():
  text = store.text_feature
  return {"prompt": text(), "chosen": text(), "rejected": text(), "domain": text(),
          "chosen_score": store.scalar_feature(np.float32),
          "rejected_score": store.scalar_feature(np.float32)}


def write_pairs(pairs: Sequence[Mapping[str, Any]], root: str, name: str, *,
                split: str = "train", metadata: Mapping[str, Any] | None = None) -> str:
  """Writes pairs as the TFDS dataset ``root/name`` (shape ``preference``).

  Args:
    pairs: dicts with ``prompt``, ``chosen``, ``rejected`` (text), optional ``domain`` and
      ``chosen_score``/``rejected_score`` (NaN when absent).
    root, name: where (see :func:`jkd.data.store.write_dataset`; never overwritten).
    split: the split name.
    metadata: JSON facts stored with the dataset (e.g. the round, the scorer).

  Returns:
    The dataset directory.
  """
  if not pairs:
    raise ValueError("no pairs to write (every prompt was skipped?): sample more (n) or use a"
                     " scorer that tells the samples apart.")
  rows = []
  for i, p in enumerate(pairs):
    try:
      row = {k: _text(p, k) for k in ("prompt", "chosen", "rejected")}
    except ValueError as e:
      raise ValueError(f"pair {i}: {e}") from None
    row["domain"] = str(p.get("domain", ""))
    for k in ("chosen_score", "rejected_score"):
      row[k] = np.float32(p.get(k, math.nan))
    rows.append(row)
  meta = {"shape": "preference", "num_pairs": len(rows), **dict(metadata or {})}
  return store.write_dataset(root, name, _pair_features(), {split: rows},
                             description="jkd preference pairs", metadata=meta)


def read_pairs(path: str, split: str = "train") -> list[dict[str, Any]]:
  """The pairs of a dataset written by :func:`write_pairs`, text decoded to ``str``."""
  src = store.open_split(path, split)
  out = []
  for i in range(len(src)):
    ex = src[i]
    out.append({k: (bytes(v).decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else
                    float(v)) for k, v in ex.items()})
  return out


# ------------------------------------------------------------------------------------------------
# 3. Reference log-probs, cached


def _token_arrays(pairs_tokenized) -> dict[str, np.ndarray]:
  if isinstance(pairs_tokenized, Mapping):
    missing = [k for k in TOKEN_FIELDS if k not in pairs_tokenized]
    if missing:
      raise ValueError(f"tokenized pairs need {list(TOKEN_FIELDS)}; missing {missing}.")
    arrays = {k: np.asarray(pairs_tokenized[k]) for k in TOKEN_FIELDS}
  else:
    rows = list(pairs_tokenized)
    if not rows:
      raise ValueError("no tokenized pairs given.")
    arrays = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in TOKEN_FIELDS}
  shape = arrays["chosen_tokens"].shape
  for k, a in arrays.items():
    if a.shape != shape or a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{k} must be an int [N, seq_len] array like chosen_tokens {list(shape)},"
                       f" got {a.dtype}{list(a.shape)}.")
  if shape[0] == 0:
    raise ValueError("no tokenized pairs given.")
  return {k: a.astype(np.int32) for k, a in arrays.items()}


def reference_fingerprint(pairs_tokenized, *, params, config: ModelConfig) -> str:
  """The cache key of :func:`reference_logprobs`: a SHA-256 hex digest.

  Hashes the cache format version, the model config, every parameter (its path, dtype, shape
  and bytes) and the four tokenized arrays (shape and bytes).
  """
  arrays = _token_arrays(pairs_tokenized)
  h = hashlib.sha256()
  h.update(f"jkd.reference_logprobs v{CACHE_FORMAT_VERSION}\n".encode())
  h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"\n{jax.tree_util.keystr(path)} {a.dtype.str} {a.shape}\n".encode())
    h.update(a.reshape(-1).view(np.uint8))
  for k in TOKEN_FIELDS:
    a = np.ascontiguousarray(arrays[k])
    h.update(f"\n{k} {a.shape}\n".encode())
    h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _load_cache(path: str, fingerprint: str, n: int) -> dict[str, np.ndarray]:
  fix = f"delete {os.path.dirname(path)} and rerun to recompute it"
  try:
    with np.load(path, allow_pickle=False) as f:
      data = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"reference log-prob cache {path} is corrupted ({e}); {fix}.") from None
  keys = ("reference_chosen_logps", "reference_rejected_logps")
  problem = None
  if any(k not in data for k in (*keys, "fingerprint", "format_version")):
    problem = f"fields {sorted(data)}"
  elif str(data["fingerprint"]) != fingerprint:
    problem = "a fingerprint that is not its directory's"
  elif int(data["format_version"]) != CACHE_FORMAT_VERSION:
    problem = f"format version {int(data['format_version'])}"
  elif any(data[k].shape != (n,) or data[k].dtype != np.float32 or not np.isfinite(data[k]).all()
           for k in keys):
    problem = f"arrays that are not {n} finite float32 values"
  if problem:
    raise ValueError(f"reference log-prob cache {path} is corrupted ({problem}); {fix}.")
  return {k: data[k] for k in keys}


def _save_cache(path: str, fingerprint: str, values: Mapping[str, np.ndarray]) -> None:
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, fingerprint=np.asarray(fingerprint), format_version=np.asarray(
          CACHE_FORMAT_VERSION), **values)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old state or the whole new file
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def reference_logprobs(pairs_tokenized, *, params, config: ModelConfig, cache_dir: str,
                       batch_size: int = 8) -> dict[str, np.ndarray]:
  """The reference model's summed completion log-probs of every pair, computed once and cached.

  ``log p_ref(y|x) = sum_t log softmax(z_t)[labels_t]`` over the completion labels (``!=
  -100``), with :func:`jkd.losses.sequence_logprobs` of a jitted forward. The result is stored
  in ``cache_dir/<fingerprint>/reference_logprobs.npz`` (:func:`reference_fingerprint`: config,
  every parameter's bytes, the tokenized data, the format version), written atomically (a
  temporary file renamed into place). A later call with the same model and data loads it
  without running the model; a change of any parameter value or of the data gives a new
  fingerprint, so a stale cache is never reused. A corrupted cache file is a ``ValueError``
  naming the file (delete it to recompute; it is never overwritten silently).

  Args:
    pairs_tokenized: :func:`tokenize_pairs` output (a dict of ``[N, T]`` arrays), or a list of
      :func:`tokenize_preference` dicts.
    params, config: the reference model (e.g. the SFT student or the teacher).
    cache_dir: the cache root directory (created).
    batch_size: pairs per forward (chosen and rejected run together: ``2 * batch_size`` rows).

  Returns:
    ``{"reference_chosen_logps": [N], "reference_rejected_logps": [N]}`` float32.
  """
  arrays = _token_arrays(pairs_tokenized)
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
  n = arrays["chosen_tokens"].shape[0]
  for side in ("chosen", "rejected"):
    labels = arrays[f"{side}_labels"]
    scoring.check_ids(arrays[f"{side}_tokens"], config.vocab_size, f"{side}_tokens")
    scoring.check_ids(labels[labels != IGNORE_INDEX], config.vocab_size, f"{side}_labels")
    empty = np.flatnonzero((labels != IGNORE_INDEX).sum(1) == 0)
    if empty.size:
      raise ValueError(f"pairs {empty[:5].tolist()} have no {side} completion label; drop them.")
  fingerprint = reference_fingerprint(arrays, params=params, config=config)
  path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), fingerprint, CACHE_FILE)
  if os.path.exists(path):
    _log.info("reference log-probs: cache hit %s", path)
    return _load_cache(path, fingerprint, n)
  # Rows chosen_0, rejected_0, chosen_1, ...: a pair's two sides in the same forward.
  interleave = lambda a, b: np.stack([a, b], 1).reshape(2 * n, -1)  # noqa: E731
  tokens = interleave(arrays["chosen_tokens"], arrays["rejected_tokens"])
  labels = interleave(arrays["chosen_labels"], arrays["rejected_labels"])
  sums, _ = scoring.batched_logprobs(params, config, tokens, labels, 2 * batch_size)
  values = {"reference_chosen_logps": sums[0::2].astype(np.float32),
            "reference_rejected_logps": sums[1::2].astype(np.float32)}
  _save_cache(path, fingerprint, values)
  return values


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m jkd.data.preference make ...``: sample, rank and write preference pairs."""
  parser = argparse.ArgumentParser(prog="python -m jkd.data.preference", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  make = sub.add_parser("make", help="sample n completions per prompt, rank, write pairs")
  make.add_argument("--policy", required=True, help="a model spec: smollm2 | gguf:PATH | hf:DIR | random:JSON")
  make.add_argument("--scorer", required=True, choices=sorted(SCORERS))
  make.add_argument("--teacher", help="teacher_logprob: a model spec (smollm2 | gguf:PATH | hf:DIR | random:JSON)")
  make.add_argument("--reward-fn", help="reward_fn: module.path:function")
  make.add_argument("--answer-field", default="answer", help="exact_match: reference field")
  make.add_argument("--prompts", required=True, help=".jsonl ({'prompt': ...}) or .txt file")
  make.add_argument("--n", type=int, default=4)
  make.add_argument("--max-new-tokens", type=int, default=64)
  make.add_argument("--temperature", type=float, default=1.0)
  make.add_argument("--seed", type=int, default=0)
  make.add_argument("--round", type=int, default=0, help="round index (fresh samples)")
  make.add_argument("--batch-size", type=int, default=8)
  make.add_argument("--no-chat-template", action="store_true")
  make.add_argument("--out", required=True, help="dataset root directory")
  make.add_argument("--name", default=None, help="dataset name (default pairs_round<R>)")
  args = parser.parse_args(argv)

  needs = {"teacher_logprob": ("teacher", "--teacher smollm2|gguf:PATH|hf:DIR"),
           "reward_fn": ("reward_fn", "--reward-fn module.path:function")}
  if args.scorer in needs and not getattr(args, needs[args.scorer][0]):
    parser.error(f"--scorer {args.scorer} needs {needs[args.scorer][1]}")
  prompts = corpus.read_prompts(args.prompts, keep=True)
  policy = model_spec.load_model(args.policy)
  options: dict[str, Any] = {}
  if args.scorer == "teacher_logprob":
    teacher = policy if args.teacher == args.policy else model_spec.load_model(args.teacher)
    options = {"params": teacher.params, "config": teacher.config,
               "batch_size": args.batch_size}
  elif args.scorer == "reward_fn":
    options = {"fn": args.reward_fn}
  elif args.scorer == "exact_match":
    options = {"field": args.answer_field}
  pairs = make_pairs(prompts, policy=(policy.params, policy.config), tokenizer=policy.tokenizer,
                     scorer=args.scorer, scorer_options=options, n=args.n,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     seed=args.seed, round_index=args.round, batch_size=args.batch_size,
                     chat_template=not args.no_chat_template)
  name = args.name or f"pairs_round{args.round}"
  path = write_pairs(pairs, args.out, name, metadata={
      "policy": args.policy, "scorer": args.scorer, "teacher": args.teacher or "",
      "n": args.n, "seed": args.seed, "round": args.round, "skipped": len(pairs.skipped)})
  print(f"{len(pairs)} pairs from {pairs.num_prompts} prompts ({len(pairs.skipped)} skipped:"
        f" equal scores or empty samples) -> {path}")
  return 0


if __name__ == "__main__":
  runtime.prepare_process()
  errors.run_main(main)
