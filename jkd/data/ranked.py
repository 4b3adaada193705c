"""Ranked response lists (TPO) and step pairs (Step-DPO): JSONL shapes, checks, tokenization.

Two JSONL shapes, one JSON object a line (other keys are ignored):

=================  ===============================================================================
ranked list        ``{"prompt": str, "responses": [str, ...], "scores": [number, ...]}``: several
                   completions of one prompt with graded preferences (higher is better; ties
                   allowed, but not all equal). Tokenized by :func:`tokenize_ranked` into the
                   engine's list batch (:mod:`jkd.train.preference_step`): ``list_tokens``,
                   ``list_labels`` ``[K, T]``, ``list_scores`` ``[K]``, ``list_mask`` ``[K]``;
                   a prompt with fewer than ``K`` responses pads the rest (``list_mask`` False).
step pair          ``{"prompt": str, "prefix": str, "chosen_step": str, "rejected_step": str}``:
                   a question, the correct reasoning steps so far (may be ``""``), and one correct
                   and one wrong next step. Tokenized by :func:`tokenize_step_pair` into a
                   preference pair whose context is the prompt **and the prefix** and whose
                   labels cover the step only.
=================  ===============================================================================

Chat template (``chat_template=True``): the prompt is a user turn followed by the generation
prompt (:func:`jkd.data.corpus.encode_prompt`); a Step-DPO prefix is the beginning of the
assistant's answer, so its ids follow the generation prompt directly (no end of turn), and the
step continues the same turn. The prefix and the step are tokenized separately, so a step's
labels are exactly its own tokens: end a prefix at a step boundary (a newline or a space), as
step-by-step solutions do. A ranked response ends with EOS (a whole answer); a step does not
(the answer goes on), unless ``eos=True``.

Bad input is a ``ValueError`` naming the file and line (or the example): scores that are not a
ranking (not one finite number per response, fewer than two responses, all equal), an empty
response or step, identical chosen and rejected steps.

References: Liao et al., *TPO*, ICLR 2025, arXiv:2410.12854; Lai et al., *Step-DPO: Step-wise
Preference Optimization for Long-chain Reasoning of LLMs*, arXiv:2406.18629, 2024.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from jkd.data import jsonl
from jkd.data import scoring
from jkd.data.corpus import encode_prompt
from jkd.data.preference import TOKEN_FIELDS

IGNORE_INDEX = scoring.IGNORE_INDEX
#: The arrays of one tokenized ranked list (``[K, T]``, ``[K, T]``, ``[K]``, ``[K]``).
LIST_FIELDS = ("list_tokens", "list_labels", "list_scores", "list_mask")
#: The fields of a step-pair line.
STEP_FIELDS = ("prompt", "prefix", "chosen_step", "rejected_step")
_OVERFLOW = ("truncate", "error", "drop")
#: One line of each JSONL shape (for messages).
RANKED_EXAMPLE = '{"prompt": "...", "responses": ["...", "..."], "scores": [1.0, 0.0]}'
STEP_EXAMPLE = ('{"prompt": "...", "prefix": "Step 1: ...\\n", "chosen_step": "Step 2: ...",'
                ' "rejected_step": "Step 2: ..."}')


def _field(example: Mapping[str, Any], key: str, shape: str) -> Any:
  if not isinstance(example, Mapping):
    raise ValueError(f"a {shape} example must be a JSON object, got {type(example).__name__}.")
  if key not in example:
    example_line = RANKED_EXAMPLE if shape == "ranked list" else STEP_EXAMPLE
    raise ValueError(f"a {shape} example needs the field {key!r} (got {sorted(example)}); e.g."
                     f" {example_line}.")
  value = example[key]
  return bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else value


def _text(example: Mapping[str, Any], key: str, shape: str) -> str:
  value = _field(example, key, shape)
  if not isinstance(value, str):
    raise ValueError(f"field {key!r} must be text, got {type(value).__name__}.")
  return value


def _check_common(seq_len: int, overflow: str) -> None:
  if overflow not in _OVERFLOW:
    raise ValueError(f"overflow must be one of {list(_OVERFLOW)}, got {overflow!r}.")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}.")


def _pad_and_eos(tokenizer, pad_id: int | None) -> tuple[int, int]:
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token (e.g. the chat"
                     " template's end-of-turn token).")
  if pad_id is None:
    pad_id = getattr(tokenizer, "pad_token_id", None)
  return int(eos) if pad_id is None else int(pad_id), int(eos)


def _ids(tokenizer, text: str) -> list[int]:
  return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _room(prompt: Sequence[int], seq_len: int, what: str) -> int:
  if len(prompt) + 1 > seq_len:
    raise ValueError(f"the {what} is {len(prompt)} tokens but seq_len is {seq_len}: no room for"
                     " a completion token. Raise seq_len or shorten it.")
  return seq_len - len(prompt)


# ------------------------------------------------------------------------------------------------
# Ranked lists (TPO)


def check_ranking(scores: Any, num_responses: int) -> np.ndarray:
  """The scores of a ranked list as float64 ``[num_responses]``, or a ``ValueError`` saying why
  they are not a ranking.

  A ranking is one finite number per response (``bool`` is not a number here), at least two
  responses, and not every score equal (equal scores give no preference to learn; ties among
  some responses are fine).

  >>> check_ranking([2, 0.5, 2], 3).tolist()
  [2.0, 0.5, 2.0]
  >>> check_ranking([1, 1], 2)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: scores are not a ranking: all 2 scores are equal (1.0), so no response is ...
  """
  if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Sequence):
    raise ValueError(f"scores are not a ranking: 'scores' must be a list of numbers, one per"
                     f" response, got {type(scores).__name__}.")
  bad = [i for i, s in enumerate(scores)
         if isinstance(s, bool) or not isinstance(s, numbers.Real)]
  if bad:
    raise ValueError(f"scores are not a ranking: scores[{bad[0]}] is {scores[bad[0]]!r}, not a"
                     " number; give one number per response (higher is better).")
  if len(scores) != num_responses:
    raise ValueError(f"scores are not a ranking: {len(scores)} scores for {num_responses}"
                     " responses; give exactly one score per response.")
  if num_responses < 2:
    raise ValueError(f"scores are not a ranking: {num_responses} response(s); a ranked list"
                     " needs at least 2 responses.")
  values = np.asarray([float(s) for s in scores], np.float64)
  if not np.isfinite(values).all():
    i = int(np.flatnonzero(~np.isfinite(values))[0])
    raise ValueError(f"scores are not a ranking: scores[{i}] is {values[i]}; every score must"
                     " be a finite number.")
  if (values == values[0]).all():
    raise ValueError(f"scores are not a ranking: all {num_responses} scores are equal"
                     f" ({values[0]}), so no response is preferred; drop the example or score"
                     " its responses apart.")
  return values


def _responses(example: Mapping[str, Any]) -> list[str]:
  responses = _field(example, "responses", "ranked list")
  if isinstance(responses, (str, bytes, Mapping)) or not isinstance(responses, Sequence):
    raise ValueError(f"'responses' must be a list of texts, got {type(responses).__name__}.")
  out = []
  for i, r in enumerate(responses):
    r = bytes(r).decode("utf-8") if isinstance(r, (bytes, np.bytes_)) else r
    if not isinstance(r, str):
      raise ValueError(f"responses[{i}] must be text, got {type(r).__name__}.")
    if not r.strip():
      raise ValueError(f"responses[{i}] is empty; remove it (and its score) or fill it.")
    out.append(r)
  return out


def ranked_list(example: Mapping[str, Any]) -> tuple[str, list[str], np.ndarray]:
  """``(prompt, responses, scores)`` of a ranked-list example, checked (no tokenizer needed).

  Raises:
    ValueError: a missing or non-text field, an empty response, scores that are not a ranking
      (:func:`check_ranking`), or one text given two different scores.
  """
  prompt = _text(example, "prompt", "ranked list")
  responses = _responses(example)
  scores = check_ranking(_field(example, "scores", "ranked list"), len(responses))
  first: dict[str, int] = {}
  for i, r in enumerate(responses):
    j = first.setdefault(r, i)
    if scores[j] != scores[i]:
      raise ValueError(f"responses[{j}] and responses[{i}] are the same text with different"
                       f" scores ({scores[j]} and {scores[i]}); keep one of them.")
  return prompt, responses, scores


def tokenize_ranked(example: Mapping[str, Any], tokenizer, *, seq_len: int,
                    list_size: int | None = None, chat_template: bool = True,
                    overflow: str = "truncate", pad_id: int | None = None
                    ) -> dict[str, np.ndarray] | None:
  """One ranked list -> the engine's list arrays (completion-only labels, padded to ``K``).

  Response ``k`` is laid out as a preference pair's side: ``prompt + response + [EOS]``
  right-padded to ``seq_len``, ``labels[t] = tokens[t + 1]`` on the response and EOS, ``-100``
  elsewhere. Slots after the last response are padding (``list_mask`` False, score 0).

  Args:
    example: ``{"prompt", "responses", "scores"}`` (see the module docstring).
    tokenizer: a ``transformers`` tokenizer with an ``eos_token_id``.
    seq_len: ``T``.
    list_size: ``K`` (default: the example's number of responses); a longer list is an error.
    chat_template: the prompt through the chat template (:func:`encode_prompt`).
    overflow: a response longer than the room after the prompt: ``"truncate"`` (cut it; EOS may
      be cut), ``"error"``, or ``"drop"`` (return None).
    pad_id: the padding token (default: the tokenizer's pad token, else EOS).

  Returns:
    ``{"list_tokens", "list_labels"}`` ``[K, T]`` int32, ``"list_scores"`` ``[K]`` float32,
    ``"list_mask"`` ``[K]`` bool; or None (``overflow="drop"``).
  """
  _check_common(seq_len, overflow)
  prompt, responses, scores = ranked_list(example)
  k = len(responses) if list_size is None else int(list_size)
  if len(responses) > k:
    raise ValueError(f"{len(responses)} responses but the list size is {k}: raise the list size"
                     " or keep fewer responses.")
  pad, eos = _pad_and_eos(tokenizer, pad_id)
  p = encode_prompt(tokenizer, prompt, chat_template=chat_template)
  room = _room(p, seq_len, "prompt")
  comps = [_ids(tokenizer, r) + [eos] for r in responses]
  longest = max(len(c) for c in comps)
  if longest > room:
    if overflow == "error":
      raise ValueError(f"a response needs {len(p) + longest} tokens (prompt {len(p)}, response"
                       f" {longest} with EOS) > seq_len {seq_len}; raise seq_len or use"
                       " overflow='truncate'/'drop'.")
    if overflow == "drop":
      return None
    comps = [c[:room] for c in comps]
  out = {"list_tokens": np.full((k, seq_len), pad, np.int32),
         "list_labels": np.full((k, seq_len), IGNORE_INDEX, np.int32),
         "list_scores": np.zeros(k, np.float32), "list_mask": np.zeros(k, bool)}
  for i, comp in enumerate(comps):
    out["list_tokens"][i], out["list_labels"][i] = scoring.sequence_layout(p, comp, seq_len, pad)
  out["list_scores"][:len(comps)] = scores
  out["list_mask"][:len(comps)] = True
  return out


def _stack(records: Iterable[tuple[str, Any]], one: Callable[[Any], dict | None],
           fields: Sequence[str], what: str) -> dict[str, np.ndarray]:
  rows, index = [], []
  for i, (where, example) in enumerate(records):
    try:
      row = one(example)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if row is not None:
      rows.append(row)
      index.append(i)
  if not rows:
    raise ValueError(f"no {what} to tokenize (empty input, or every example was dropped).")
  out = {k: np.stack([r[k] for r in rows]) for k in fields}
  out["example_index"] = np.asarray(index, np.int64)
  return out


def _numbered(examples: Iterable[Any], source: str | None) -> Iterator[tuple[str, Any]]:
  for i, ex in enumerate(examples):
    yield (f"{source}:{i + 1}" if source else f"example {i}"), ex


def tokenize_ranked_lists(examples: Iterable[Mapping[str, Any]], tokenizer, *, seq_len: int,
                          list_size: int | None = None, chat_template: bool = True,
                          overflow: str = "truncate", pad_id: int | None = None,
                          source: str | None = None) -> dict[str, np.ndarray]:
  """:func:`tokenize_ranked` over many lists, stacked to ``[N, K, T]``.

  Args:
    examples: ranked-list records (for files, :func:`read_ranked_jsonl`: errors name the file
      and line).
    list_size: ``K``; default the longest list of ``examples``.
    source: a name for error messages (``source:line``, counting examples from line 1).
    tokenizer, seq_len, chat_template, overflow, pad_id: see :func:`tokenize_ranked`.

  Returns:
    :data:`LIST_FIELDS` stacked (``[N, K, T]``, ``[N, K, T]``, ``[N, K]``, ``[N, K]``) and
    ``example_index`` ``[N]`` int64 (the position of each kept list).
  """
  return _tokenize_ranked_records(list(_numbered(examples, source)), tokenizer, seq_len=seq_len,
                                  list_size=list_size, chat_template=chat_template,
                                  overflow=overflow, pad_id=pad_id)


def _tokenize_ranked_records(records: list[tuple[str, Any]], tokenizer, *, seq_len, list_size,
                             chat_template, overflow, pad_id) -> dict[str, np.ndarray]:
  if list_size is None:
    sizes = []
    for where, ex in records:
      try:
        sizes.append(len(ranked_list(ex)[1]))
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    list_size = max(sizes, default=2)
  elif isinstance(list_size, bool) or not isinstance(list_size, int) or list_size < 2:
    raise ValueError(f"list_size must be an int >= 2 (responses per prompt), got {list_size!r}.")
  return _stack(records, lambda ex: tokenize_ranked(
      ex, tokenizer, seq_len=seq_len, list_size=list_size, chat_template=chat_template,
      overflow=overflow, pad_id=pad_id), LIST_FIELDS, "ranked list")


# ------------------------------------------------------------------------------------------------
# Step pairs (Step-DPO)


def step_pair(example: Mapping[str, Any]) -> tuple[str, str, str, str]:
  """``(prompt, prefix, chosen_step, rejected_step)`` of a step-pair example, checked.

  Raises:
    ValueError: a missing or non-text field, an empty step, or ``chosen_step ==
      rejected_step``. The prefix may be empty (the first step is the one in question).
  """
  prompt, prefix, chosen, rejected = (_text(example, k, "step pair") for k in STEP_FIELDS)
  for name, value in (("chosen_step", chosen), ("rejected_step", rejected)):
    if not value.strip():
      raise ValueError(f"{name} is an empty step; every pair needs a non-empty correct and"
                       " wrong next step (drop the line or fill it).")
  if chosen == rejected:
    raise ValueError("chosen_step == rejected_step: the pair carries no preference; drop it.")
  return prompt, prefix, chosen, rejected


def step_context(tokenizer, prompt: str, prefix: str, *, chat_template: bool = True) -> list[int]:
  """The ids a step is conditioned on: the prompt (as a user turn plus the generation prompt
  with ``chat_template``) followed by the prefix, the start of the assistant's answer."""
  ids = encode_prompt(tokenizer, prompt, chat_template=chat_template)
  return ids + (_ids(tokenizer, prefix) if prefix else [])


def tokenize_step_pair(example: Mapping[str, Any], tokenizer, *, seq_len: int,
                       chat_template: bool = True, overflow: str = "truncate",
                       pad_id: int | None = None, eos: bool = False
                       ) -> dict[str, np.ndarray] | None:
  """One Step-DPO example -> a tokenized preference pair whose labels cover the step only.

  Each side is ``context + step`` (``+ [EOS]`` with ``eos``), ``context`` =
  :func:`step_context` (prompt and prefix, the same ids on both sides), right-padded to
  ``seq_len``; ``labels[t] = tokens[t + 1]`` where ``t + 1`` is a step token, else ``-100``.

  Args:
    example: ``{"prompt", "prefix", "chosen_step", "rejected_step"}`` text.
    tokenizer: a ``transformers`` tokenizer.
    seq_len: length of every output array.
    chat_template: the prompt through the chat template; the prefix continues the assistant turn.
    overflow: a step longer than the room after the context: ``"truncate"``, ``"error"`` or
      ``"drop"`` (None). The context is never cut.
    pad_id: the padding token (default: the tokenizer's pad token, else EOS).
    eos: end each step with EOS (False: Step-DPO's steps do not end the answer).

  Returns:
    The four :data:`jkd.data.preference.TOKEN_FIELDS` (``chosen_tokens``, ``chosen_labels``,
    ``rejected_tokens``, ``rejected_labels``), ``[seq_len]`` int32 each; or None.
  """
  _check_common(seq_len, overflow)
  prompt, prefix, chosen, rejected = step_pair(example)
  pad, eos_id = _pad_and_eos(tokenizer, pad_id)
  ctx = step_context(tokenizer, prompt, prefix, chat_template=chat_template)
  room = _room(ctx, seq_len, "prompt with its prefix")
  steps = [_ids(tokenizer, s) + ([eos_id] if eos else []) for s in (chosen, rejected)]
  for name, ids in zip(("chosen_step", "rejected_step"), steps):
    if not ids:
      raise ValueError(f"{name} is an empty step after tokenization; fill it.")
  if max(len(s) for s in steps) > room:
    if overflow == "error":
      raise ValueError(f"the pair needs {len(ctx) + max(len(s) for s in steps)} tokens (prompt"
                       f" and prefix {len(ctx)}, chosen_step {len(steps[0])}, rejected_step"
                       f" {len(steps[1])}) > seq_len {seq_len}; raise seq_len or use"
                       " overflow='truncate'/'drop'.")
    if overflow == "drop":
      return None
    steps = [s[:room] for s in steps]
    if steps[0] == steps[1]:
      raise ValueError(f"chosen_step and rejected_step are identical in their first {room}"
                       f" tokens, all that fits in seq_len {seq_len} after the {len(ctx)}-token"
                       " prompt and prefix; raise seq_len or drop the pair.")
  out = {}
  for side, ids in zip(("chosen", "rejected"), steps):
    out[f"{side}_tokens"], out[f"{side}_labels"] = scoring.sequence_layout(ctx, ids, seq_len, pad)
  return out


def tokenize_step_pairs(examples: Iterable[Mapping[str, Any]], tokenizer, *, seq_len: int,
                        chat_template: bool = True, overflow: str = "truncate",
                        pad_id: int | None = None, eos: bool = False,
                        source: str | None = None) -> dict[str, np.ndarray]:
  """:func:`tokenize_step_pair` over many examples, stacked to ``[N, T]`` pair arrays (and
  ``example_index`` ``[N]``); ``source`` names them in errors (``source:line``)."""
  return _stack(_numbered(examples, source), lambda ex: tokenize_step_pair(
      ex, tokenizer, seq_len=seq_len, chat_template=chat_template, overflow=overflow,
      pad_id=pad_id, eos=eos), TOKEN_FIELDS, "step pair")


# ------------------------------------------------------------------------------------------------
# JSONL files


def jsonl_records(paths: str | Sequence[str]) -> Iterator[tuple[str, Any]]:
  """``("file:line", record)`` of every non-blank line of the JSONL files ``paths`` (paths,
  globs, or one comma-separated string of them)."""
  for path in jsonl.expand_paths(jsonl.split_paths(paths) if isinstance(paths, str) else paths):
    yield from jsonl.records(path)


def read_ranked_jsonl(paths: str | Sequence[str], tokenizer, *, seq_len: int,
                      list_size: int | None = None, chat_template: bool = True,
                      overflow: str = "truncate", pad_id: int | None = None
                      ) -> dict[str, np.ndarray]:
  """The ranked lists of JSONL files, tokenized (:func:`tokenize_ranked_lists`); ``K`` is
  ``list_size`` or the longest list in the files; errors name the file and line."""
  return _tokenize_ranked_records(list(jsonl_records(paths)), tokenizer, seq_len=seq_len,
                                  list_size=list_size, chat_template=chat_template,
                                  overflow=overflow, pad_id=pad_id)


def read_step_pairs_jsonl(paths: str | Sequence[str], tokenizer, *, seq_len: int,
                          chat_template: bool = True, overflow: str = "truncate",
                          pad_id: int | None = None, eos: bool = False) -> dict[str, np.ndarray]:
  """The step pairs of JSONL files, tokenized (:func:`tokenize_step_pair`), stacked ``[N, T]``;
  errors name the file and line."""
  return _stack(jsonl_records(paths), lambda ex: tokenize_step_pair(
      ex, tokenizer, seq_len=seq_len, chat_template=chat_template, overflow=overflow,
      pad_id=pad_id, eos=eos), TOKEN_FIELDS, "step pair")


# ------------------------------------------------------------------------------------------------
# Synthetic lists (tests and CPU smoke runs)


def synthetic_ranked_examples(n: int, seq_len: int, vocab: int, *, list_size: int = 4,
                              seed: int = 0) -> dict[str, np.ndarray]:
  """Random ranked lists of token ids: each of ``n`` prompts (2 to ``seq_len // 2`` random ids)
  has 2 to ``list_size`` different random completions, scored with integer grades 0 to 3 (not
  all equal), laid out as :func:`tokenize_ranked` does (padding 0). Deterministic in ``seed``.

  Returns:
    :data:`LIST_FIELDS`: ``[n, list_size, seq_len]`` int32 tokens and labels, ``[n, list_size]``
    float32 scores and bool mask.

  >>> ex = synthetic_ranked_examples(3, 8, 16, list_size=3)
  >>> ex["list_tokens"].shape, bool(ex["list_mask"][:, :2].all())
  ((3, 3, 8), True)
  """
  if n <= 0 or seq_len < 4 or vocab < 3 or list_size < 2:
    raise ValueError(f"synthetic lists need n >= 1, seq_len >= 4, vocab >= 3 and list_size >= 2"
                     f" (got {n}, {seq_len}, {vocab}, {list_size}).")
  rng = np.random.default_rng(seed)
  out = {"list_tokens": np.zeros((n, list_size, seq_len), np.int32),
         "list_labels": np.full((n, list_size, seq_len), IGNORE_INDEX, np.int32),
         "list_scores": np.zeros((n, list_size), np.float32),
         "list_mask": np.zeros((n, list_size), bool)}
  for i in range(n):
    prompt = rng.integers(1, vocab, size=rng.integers(2, seq_len // 2 + 1)).tolist()
    room = seq_len - len(prompt)
    k = int(rng.integers(2, list_size + 1))
    comps: list[list[int]] = []
    while len(comps) < k:
      c = rng.integers(1, vocab, size=rng.integers(1, room + 1)).tolist()
      if c not in comps:
        comps.append(c)
    scores = rng.integers(0, 4, size=k).astype(np.float32)
    while (scores == scores[0]).all():
      scores = rng.integers(0, 4, size=k).astype(np.float32)
    for j, c in enumerate(comps):
      out["list_tokens"][i, j], out["list_labels"][i, j] = scoring.sequence_layout(
          prompt, c, seq_len, 0)
    out["list_scores"][i, :k], out["list_mask"][i, :k] = scores, True
  return out
