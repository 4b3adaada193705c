"""Examples -> token arrays: next-token labels, completion-only loss, padding and packing.

Pure functions over a ``transformers`` tokenizer. Conventions (those of :mod:`jkd.losses`):
``labels[t]`` is the token after position ``t`` (``-100`` where no loss is taken: prompt
tokens, non-assistant turns, padding, and the last position of an untruncated example), and
``loss_mask = labels != -100``.

- ``text``: every token is trained; EOS is appended (when the tokenizer has one).
- ``prompt_completion``: with ``chat_template=True`` a user/assistant chat through
  ``tokenizer.apply_chat_template``; the completion starts where the prompt rendered with
  ``add_generation_prompt=True`` ends (checked to be a prefix of the whole conversation). With
  ``chat_template=False``: ``tokenize(prompt) + tokenize(completion) + [EOS]``.
- ``chat``: only the assistant turns are trained (each located the same prefix-checked way).
- ``preference``: the prompt with the chosen and with the rejected completion, as two
  ``prompt_completion`` examples (keys ``chosen_*`` and ``rejected_*``).

EOS is appended to a completion (the final assistant turn) when the template does not end it
with EOS. Empty text/completion is a ``ValueError`` (a JSONL import rejects such lines, so only
hand-made data can reach it). An example longer than ``seq_len`` is cut (``overflow="truncate"``,
counted in ``counts["truncated"]``) or a ``ValueError`` (``overflow="error"``); one with no
trained token left after the cut is skipped (returns None, ``counts["no_target"]``).

>>> ids = [5, 6, 7, 8]
>>> ex = finish_example(ids, [False, False, True, True], seq_len=8)
>>> ex["tokens"].tolist(), ex["labels"].tolist(), ex["loss_mask"].tolist()
([5, 6, 7, 8], [-100, 7, 8, -100], [False, True, True, False])
>>> row = next(pack_examples([ex, ex], 10))
>>> row["segment_ids"].tolist(), row["positions"].tolist()
([1, 1, 1, 1, 2, 2, 2, 2, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterable, Iterator, Mapping, MutableMapping, Sequence

import numpy as np

from jkd.losses.tokens import IGNORE_INDEX  # noqa: F401  (re-exported: jkd.data.IGNORE_INDEX)
#: ``overflow`` values: cut long examples (counted) or raise.
OVERFLOW = ("truncate", "error")
#: Shapes :func:`tokenize_example` understands (those of :data:`jkd.data.jsonl.SHAPES`).
TEXT_SHAPES = ("text", "prompt_completion", "chat", "preference")
#: Per-token fields and their padding values.
PAD_VALUES = {"tokens": 0, "labels": IGNORE_INDEX, "loss_mask": False, "segment_ids": 0,
              "positions": 0}


def _str(x: Any) -> Any:
  return x.decode("utf-8") if isinstance(x, bytes) else x


def _ids(encoded: Any) -> list[int]:
  """Token ids from whatever a tokenizer call returned (list, dict/BatchEncoding, array)."""
  if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
    encoded = encoded["input_ids"]
  return [int(i) for i in np.asarray(encoded).reshape(-1)]


def _chat_ids(tokenizer, messages: Sequence[Mapping[str, str]], *,
              add_generation_prompt: bool) -> list[int]:
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError("the tokenizer has no chat template; set data.chat_template=False"
                     " (plain prompt + completion) or use a tokenizer with a template.")
  return _ids(tokenizer.apply_chat_template(list(messages), tokenize=True,
                                            add_generation_prompt=add_generation_prompt))


def _messages(value: Any, role: str) -> list[dict[str, str]]:
  """A message list from a list of messages, or a plain string (one ``role`` turn)."""
  value = _str(value)
  if isinstance(value, str):
    return [{"role": role, "content": value}]
  return [dict(m) for m in value]


def _eos(tokenizer) -> int | None:
  return getattr(tokenizer, "eos_token_id", None)


def _chat_targets(tokenizer, messages: list[dict[str, str]], name: str
                  ) -> tuple[list[int], list[bool]]:
  """Ids of a conversation and which tokens belong to assistant turns."""
  full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
  target = [False] * len(full)
  last_end = None
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    if i == 0:
      raise ValueError(f"{name}: the conversation starts with an assistant message; put a"
                       " system or user message first.")
    before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
    through = _chat_ids(tokenizer, messages[:i + 1], add_generation_prompt=False)
    for part, what in ((before, "with add_generation_prompt=True"), (through, "")):
      if full[:len(part)] != part:
        raise ValueError(f"{name}: the chat template renders the conversation up to message"
                         f" {i} {what} as something that is not a prefix of the whole"
                         " conversation, so the assistant tokens cannot be located; use a"
                         " template that renders turns append-only, or"
                         " data.chat_template=False.")
    target[len(before):len(through)] = [True] * (len(through) - len(before))
    last_end = (len(before), len(through))
  if last_end is None:
    raise ValueError(f"{name}: no assistant message: nothing to train on.")
  eos = _eos(tokenizer)
  if (eos is not None and messages[-1]["role"] == "assistant" and
      eos not in full[last_end[0]:last_end[1]]):
    full, target = full + [eos], target + [True]
  return full, target


def _completion_targets(tokenizer, prompt: Any, completion: Any, *, chat_template: bool,
                        name: str) -> tuple[list[int], list[bool]]:
  completion = _str(completion)
  if isinstance(completion, str) and not completion.strip():
    raise ValueError(f"{name}: empty completion; remove the example or fill it.")
  if chat_template:
    messages = _messages(prompt, "user") + _messages(completion, "assistant")
    return _chat_targets(tokenizer, messages, name)
  prompt = _str(prompt)
  if not isinstance(prompt, str) or not isinstance(completion, str):
    raise ValueError(f"{name}: chat-style messages need data.chat_template=True.")
  p = _ids(tokenizer(prompt, add_special_tokens=True)["input_ids"])
  c = _ids(tokenizer(completion, add_special_tokens=False)["input_ids"])
  eos = _eos(tokenizer)
  if eos is not None and (not c or c[-1] != eos):
    c.append(eos)
  return p + c, [False] * len(p) + [True] * len(c)


def _text_targets(tokenizer, text: Any, name: str) -> tuple[list[int], list[bool]]:
  text = _str(text)
  if not isinstance(text, str) or not text.strip():
    raise ValueError(f"{name}: empty or non-string text; remove the example or fill it.")
  ids = _ids(tokenizer(text, add_special_tokens=True)["input_ids"])
  eos = _eos(tokenizer)
  if eos is not None and ids[-1] != eos:
    ids.append(eos)
  return ids, [True] * len(ids)


def finish_example(ids: Sequence[int], target: Sequence[bool], *, seq_len: int,
                   overflow: str = "truncate", vocab_size: int | None = None,
                   name: str = "example", counts: MutableMapping[str, int] | None = None
                   ) -> dict[str, np.ndarray] | None:
  """Next-token arrays of a token sequence and its trained tokens.

  Args:
    ids: ``[L]`` token ids.
    target: ``[L]`` bool, whether token ``i`` is trained (predicted from position ``i - 1``).
    seq_len: the maximum length; a longer example is cut (``"truncate"``) or an error.
    overflow: one of :data:`OVERFLOW`.
    vocab_size: the model's vocabulary; an id ``>=`` it is a ValueError.
    name: the example's name in error messages.
    counts: a counter updated with ``truncated`` / ``no_target``.

  Returns:
    ``{"tokens", "labels": [n] int32, "loss_mask": [n] bool}`` with ``n = min(L, seq_len)``,
    or None when no trained token is left.
  """
  if overflow not in OVERFLOW:
    raise ValueError(f"overflow must be one of {OVERFLOW} (got {overflow!r}).")
  counts = collections.Counter() if counts is None else counts
  ids = np.asarray(ids, np.int64)
  target = np.asarray(target, bool)
  if vocab_size is not None and ids.size and (ids.max() >= vocab_size or ids.min() < 0):
    raise ValueError(f"{name}: token id {int(ids.max())} is outside the model's vocabulary of"
                     f" {vocab_size}: the tokenizer and the model do not match (tokenizer"
                     " vocabulary larger than the model's); use the teacher's tokenizer.")
  n = len(ids)
  if n > seq_len:
    if overflow == "error":
      raise ValueError(f"{name} has {n} tokens, more than data.seq_len={seq_len}; raise"
                       " data.seq_len, or set data.overflow='truncate' to cut such examples.")
    counts["truncated"] += 1
    nxt, nxt_target = ids[1:seq_len + 1], target[1:seq_len + 1]
    ids = ids[:seq_len]
  else:
    nxt = np.append(ids[1:], 0)
    nxt_target = np.append(target[1:], False)
  if not nxt_target.any():
    counts["no_target"] += 1
    return None
  return {"tokens": ids.astype(np.int32),
          "labels": np.where(nxt_target, nxt, IGNORE_INDEX).astype(np.int32),
          "loss_mask": nxt_target.copy()}


def tokenize_example(example: Mapping[str, Any], tokenizer, *, shape: str, seq_len: int,
                     chat_template: bool = True, overflow: str = "truncate",
                     vocab_size: int | None = None, name: str = "example",
                     counts: MutableMapping[str, int] | None = None
                     ) -> dict[str, np.ndarray] | None:
  """Tokenises one example of a JSONL shape (fields may be ``bytes``, as TFDS returns them).

  Args:
    example: ``{"text"}``, ``{"prompt", "completion"}``, ``{"messages"}`` (a list or its JSON
      string) or ``{"prompt", "chosen", "rejected"}`` (strings or message lists).
    tokenizer: a ``transformers`` tokenizer (with a chat template when ``chat_template``).
    shape: one of :data:`TEXT_SHAPES`.
    seq_len: maximum length ``n`` of the result.
    chat_template: render prompt/completion as a user/assistant chat.
    overflow: ``"truncate"`` or ``"error"`` for examples longer than ``seq_len``.
    vocab_size: the model's vocabulary size (ids must be below it).
    name: how errors name the example (e.g. ``"train example 17"``).
    counts: a counter (``collections.Counter``) of ``truncated`` and ``no_target``.

  Returns:
    ``{"tokens": [n] int32, "labels": [n] int32, "loss_mask": [n] bool}`` (unpadded,
    ``n <= seq_len``), for ``preference`` the same under ``chosen_`` and ``rejected_``
    prefixes; None when truncation left nothing to train.
  """
  kw = dict(seq_len=seq_len, overflow=overflow, vocab_size=vocab_size, counts=counts)
  if shape == "text":
    return finish_example(*_text_targets(tokenizer, example["text"], name), name=name, **kw)
  if shape == "prompt_completion":
    return finish_example(*_completion_targets(tokenizer, example["prompt"],
                                               example["completion"],
                                               chat_template=chat_template, name=name),
                          name=name, **kw)
  if shape == "chat":
    if not chat_template:
      raise ValueError(f"{name}: a 'chat' example needs chat_template=True.")
    messages = example["messages"]
    messages = json.loads(_str(messages)) if isinstance(messages, (str, bytes)) else messages
    return finish_example(*_chat_targets(tokenizer, [dict(m) for m in messages], name),
                          name=name, **kw)
  if shape == "preference":
    out = {}
    for side in ("chosen", "rejected"):
      one = finish_example(*_completion_targets(tokenizer, example["prompt"], example[side],
                                                chat_template=chat_template,
                                                name=f"{name} ({side})"),
                           name=f"{name} ({side})", **kw)
      if one is None:
        return None
      out.update({f"{side}_{k}": v for k, v in one.items()})
    return out
  raise ValueError(f"unknown shape {shape!r}; choose one of {TEXT_SHAPES}.")


def pad_example(example: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Right-pads every ``[n, ...]`` array to ``[seq_len, ...]``.

  Padding is ``-100`` for ``labels`` (and ``*_labels``), False/0 otherwise, so padded positions
  never count.

  Raises:
    ValueError: an array longer than ``seq_len``.
  """
  out = {}
  for k, v in example.items():
    v = np.asarray(v)
    n = v.shape[0] if v.ndim else None
    if n is None or n > seq_len:
      raise ValueError(f"field {k!r} has shape {v.shape}; pad_example needs [n <= seq_len="
                       f"{seq_len}, ...] arrays (truncate first).")
    fill = IGNORE_INDEX if k == "labels" or k.endswith("_labels") else 0
    pad = np.full((seq_len - n, *v.shape[1:]), fill, v.dtype)
    out[k] = np.concatenate([v, pad])
  return out


def _row(docs: list[Mapping[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  out = {k: np.full((seq_len,), PAD_VALUES[k], np.bool_ if k == "loss_mask" else np.int32)
         for k in PAD_VALUES}
  at = 0
  for seg, d in enumerate(docs, 1):
    n = len(d["tokens"])
    for k in ("tokens", "labels", "loss_mask"):
      out[k][at:at + n] = d[k]
    out["segment_ids"][at:at + n] = seg
    out["positions"][at:at + n] = np.arange(n)
    at += n
  return out


class Packer:
  """First-fit packing in groups: a group fills ``num_bins`` open rows and ends (all its rows
  emitted in order) when an example fits none of them. Deterministic, and a group depends only
  on where it starts, which makes a packed stream resumable from ``(group start, rows
  emitted)`` (see :class:`jkd.data.pipeline.DataPipeline`)."""

  def __init__(self, seq_len: int, num_bins: int = 8):
    if seq_len <= 0 or num_bins <= 0:
      raise ValueError(f"seq_len and num_bins must be positive (got {seq_len}, {num_bins}).")
    self.seq_len, self.num_bins = int(seq_len), int(num_bins)

  def fits(self, ex: Mapping[str, np.ndarray]) -> None:
    extra = sorted(set(ex) - {"tokens", "labels", "loss_mask"})
    if extra:
      raise ValueError(f"packing keeps only tokens, labels and loss_mask, and the examples also"
                       f" have {extra}; use data.pack=False (padding) for such data.")
    n = len(ex["tokens"])
    if n > self.seq_len:
      raise ValueError(f"an example of {n} tokens cannot be packed into rows of"
                       f" {self.seq_len}; truncate first (tokenize_example does).")

  def group(self, first: Mapping[str, np.ndarray] | None, pull) -> tuple[list[dict], Any]:
    """Packs ``first`` and then ``pull()`` results (None: the end) until one does not fit.

    Returns:
      ``(rows, leftover)``: the group's ``[seq_len]`` rows and the example that did not fit
      (None at the end of the input).
    """
    bins: list[list] = []
    free: list[int] = []
    ex = first if first is not None else pull()
    while ex is not None:
      self.fits(ex)
      n = len(ex["tokens"])
      slot = next((i for i, f in enumerate(free) if f >= n), None)
      if slot is None and len(bins) < self.num_bins:
        bins.append([])
        free.append(self.seq_len)
        slot = len(bins) - 1
      if slot is None:
        break
      bins[slot].append(ex)
      free[slot] -= n
      ex = pull()
    return [_row(b, self.seq_len) for b in bins], ex


def pack_examples(examples: Iterable[Mapping[str, np.ndarray]], seq_len: int, *,
                  num_bins: int = 8) -> Iterator[dict[str, np.ndarray]]:
  """Packs unpadded examples into ``[seq_len]`` rows (first fit over ``num_bins`` open rows).

  Args:
    examples: dicts with ``tokens``, ``labels``, ``loss_mask`` ``[n]`` arrays, ``n <= seq_len``.
    seq_len: the row length.
    num_bins: rows open at once (more: fuller rows).

  Yields:
    ``{"tokens", "labels", "loss_mask", "segment_ids", "positions"}``, each ``[seq_len]``:
    ``segment_ids`` are ``1..k`` for the row's ``k`` documents and 0 on padding, ``positions``
    restart at 0 for every document (pass both to :func:`jkd.models.apply`, so no attention
    crosses documents). Padding has label ``-100`` and ``loss_mask`` False.
  """
  packer = Packer(seq_len, num_bins)
  it = iter(examples)
  pull = lambda: next(it, None)  # noqa: E731
  leftover = None
  while True:
    rows, leftover = packer.group(leftover, pull)
    if not rows:
      return
    yield from rows
    if leftover is None:
      return
