"""JSONL files -> a TFDS dataset (ArrayRecord, via :mod:`jkd.data.store`), validated line by line.

Four shapes (:data:`SHAPES`), detected from the first line's keys unless given:

============== =============================================== =================================
shape          one line                                        stored text fields
============== =============================================== =================================
``text``       ``{"text": str}``                               ``text``
``prompt_completion`` ``{"prompt": str, "completion": str}``   ``prompt``, ``completion``
``chat``       ``{"messages": [{"role", "content"}, ...]}``    ``messages`` (a JSON string)
``preference`` ``{"prompt", "chosen", "rejected"}``            ``prompt``, ``chosen``,
                                                               ``rejected``
============== =============================================== =================================

Every shape may carry ``"domain": str`` (stored, ``""`` when absent); other keys are ignored.
In ``preference`` the prompt, chosen and rejected may each be a string or a chat-style list of
``{"role", "content"}`` messages (stored as JSON strings; the dataset metadata's ``json_fields``
says which), consistently over the whole dataset. ``completion``, ``text``, ``chosen`` and
``rejected`` must not be empty; a ``chat`` needs at least one non-empty ``assistant`` message.
A bad line is a ``ValueError`` naming the file and line. The dataset metadata
(:func:`jkd.data.read_metadata`) is ``{"shape", "sources", "count", "json_fields",
"splits"}``.

Command line::

    python -m jkd.data.jsonl --input a.jsonl [--input b.jsonl] --root DIR --name NAME \\
        [--shape prompt_completion] [--eval_fraction 0.05] [--seed 0]

>>> import json, os, tempfile
>>> d = tempfile.mkdtemp(); f = os.path.join(d, "a.jsonl")
>>> with open(f, "w") as fh:
...   for i in range(4): print(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}), file=fh)
>>> path = build_jsonl_dataset([f], d, "toy", eval_fraction=0.25)
>>> from jkd.data import open_split, read_metadata
>>> read_metadata(path)["shape"], len(open_split(path, "train")), len(open_split(path, "eval"))
('prompt_completion', 3, 1)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jkd import errors
from jkd.data import store


@dataclasses.dataclass(frozen=True)
class Shape:
  """One JSONL shape: its fields, which must be non-empty, and which may be message lists."""
  fields: tuple[str, ...]
  nonempty: tuple[str, ...]
  messages: tuple[str, ...] = ()  # fields that may (or, for chat, must) be message lists.
  example: str = ""


#: The JSONL shapes (the one table of required fields, non-empty fields and message fields).
SHAPES: dict[str, Shape] = {
    "text": Shape(("text",), ("text",), example='{"text": "..."}'),
    "prompt_completion": Shape(("prompt", "completion"), ("completion",),
                               example='{"prompt": "...", "completion": "..."}'),
    "chat": Shape(("messages",), (), ("messages",),
                  example='{"messages": [{"role": "user", "content": "..."}, {"role":'
                          ' "assistant", "content": "..."}]}'),
    "preference": Shape(("prompt", "chosen", "rejected"), ("chosen", "rejected"),
                        ("prompt", "chosen", "rejected"),
                        example='{"prompt": "...", "chosen": "...", "rejected": "..."}'),
}
#: Message roles accepted in chat-style fields.
ROLES = ("system", "user", "assistant", "tool")
#: The optional per-example field stored with every shape.
DOMAIN = "domain"


def shape_help() -> str:
  return "; ".join(f"{name}: {s.example}" for name, s in SHAPES.items())


def detect_shape(keys, where: str = "") -> str:
  """The shape whose fields all appear in ``keys`` (a ValueError when none or several do)."""
  found = [name for name, s in SHAPES.items() if set(s.fields) <= set(keys)]
  if len(found) == 1:
    return found[0]
  if not found:
    raise ValueError(f"{where}: keys {sorted(keys)} match no JSONL shape; each line needs the"
                     f" fields of one shape ({shape_help()}).")
  raise ValueError(f"{where}: keys {sorted(keys)} match several shapes {found}; pass the shape"
                   " (--shape / shape=).")


def _check_messages(value: Any, where: str, field: str, *, need_assistant: bool) -> None:
  if not isinstance(value, list) or not value:
    raise ValueError(f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}}"
                     f" messages (got {type(value).__name__}).")
  for i, m in enumerate(value):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise ValueError(f"{where}: {field}[{i}] must be {{'role': str, 'content': str}}"
                       f" (got {json.dumps(m)[:80]}).")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: {field}[{i}] has role {m['role']!r}; use one of {ROLES}.")
  if need_assistant and not any(m["role"] == "assistant" and m["content"] for m in value):
    raise ValueError(f"{where}: {field!r} has no non-empty 'assistant' message: nothing to"
                     " train on.")


def validate_line(record: Any, shape: str, where: str) -> dict[str, str]:
  """Checks one parsed JSONL record against ``shape``; returns its stored (string) fields.

  Message lists are returned as JSON strings; ``domain`` is always present.
  """
  spec = SHAPES[shape]
  if not isinstance(record, dict):
    raise ValueError(f"{where}: a line must be a JSON object, got {type(record).__name__}.")
  missing = [f for f in spec.fields if f not in record]
  if missing:
    others = [n for n, s in SHAPES.items() if n != shape and set(s.fields) <= set(record)]
    if others:
      raise ValueError(f"{where}: mixed shapes: this line is a {others[0]!r} example but the"
                       f" dataset is {shape!r} (given, or from its first line); put each shape"
                       " in its own dataset.")
    raise ValueError(f"{where}: missing field(s) {missing}; a {shape!r} line needs"
                     f" {list(spec.fields)}, e.g. {spec.example}.")
  out = {}
  for f in spec.fields:
    value = record[f]
    if f in spec.messages and (isinstance(value, list) or shape == "chat"):
      _check_messages(value, where, f, need_assistant=shape == "chat")
      out[f] = json.dumps(value, ensure_ascii=False)
      continue
    if not isinstance(value, str):
      kinds = "a string or a list of messages" if f in spec.messages else "a string"
      raise ValueError(f"{where}: field {f!r} must be {kinds}, got {type(value).__name__}.")
    if f in spec.nonempty and not value.strip():
      raise ValueError(f"{where}: field {f!r} is empty; remove the line or fill it.")
    out[f] = value
  domain = record.get(DOMAIN, "")
  if not isinstance(domain, str):
    raise ValueError(f"{where}: field 'domain' must be a string, got {type(domain).__name__}.")
  out[DOMAIN] = domain
  return out


def split_paths(value: str | Sequence[str]) -> list[str]:
  """Paths of a config value: a list, or one string of comma-separated paths or globs.

  >>> split_paths("a.jsonl, b/*.jsonl,"), split_paths(["c.jsonl"])
  (['a.jsonl', 'b/*.jsonl'], ['c.jsonl'])
  """
  if isinstance(value, str):
    return [p.strip() for p in value.split(",") if p.strip()]
  return [str(v) for v in value]


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Files of ``paths`` (a path, a glob, or a list of them), in order; an error if none."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.path.expanduser(os.fspath(p))
    matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise FileNotFoundError(f"no JSONL file at {p!r}; check the path (globs are allowed).")
    out.extend(os.path.abspath(m) for m in matches)
  if not out:
    raise ValueError("no JSONL files given.")
  return out


def read_text_lines(path: str) -> Iterator[tuple[int, str]]:
  """``(line number, line)`` of a UTF-8 text file, its lines as text mode reads them.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: a line that is not UTF-8 (the message names the file, line, byte and column).

  >>> import os, tempfile
  >>> f = os.path.join(tempfile.mkdtemp(), "t.txt")
  >>> _ = open(f, "wb").write(b"ok\\r\\n\\xff!\\n")
  >>> next(read_text_lines(f))
  (1, 'ok\\n')
  >>> list(read_text_lines(f))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: ...t.txt:2: not UTF-8 text (byte 0xff at column 1); re-save the file as UTF-8.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no file at {path!r}; check the path.")
  lineno = 0
  with open(path, "rb") as f:
    for raw in f:
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        column = len(raw[:e.start].decode("utf-8")) + 1
        raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text (byte 0x{raw[e.start]:02x}"
                         f" at column {column}); re-save the file as UTF-8.") from None
      # Universal newlines, as text mode: "\r\n" and a lone "\r" end a line too.
      pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
      lines = [p + "\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
      for line in lines:
        lineno += 1
        yield lineno, line


def records(path: str) -> Iterator[tuple[str, Any]]:
  """``("file:line", parsed record)`` for every non-blank line of the JSONL file ``path``."""
  for i, line in read_text_lines(path):
    if not line.strip():
      continue
    where = f"{path}:{i}"
    try:
      yield where, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must"
                       " be one JSON object.") from None


def _first_keys(path: str) -> tuple[str, Any]:
  for where, record in records(path):
    if not isinstance(record, dict):
      raise ValueError(f"{where}: a line must be a JSON object, got {type(record).__name__}.")
    return where, record
  raise ValueError(f"{path}: the file holds no examples.")


def _scan(files: Sequence[str], shape: str) -> tuple[list[int], dict[str, bool]]:
  """Validates every line; returns per-file counts and, per message field, whether lists."""
  counts, kinds = [], {}
  for path in files:
    n = 0
    for where, record in records(path):
      validate_line(record, shape, where)
      for f in SHAPES[shape].messages:
        is_list = isinstance(record[f], list)
        if kinds.setdefault(f, is_list) != is_list:
          raise ValueError(f"{where}: field {f!r} is a {'list' if is_list else 'string'} here"
                           f" but a {'string' if is_list else 'list'} on earlier lines; use one"
                           " form in the whole dataset.")
      n += 1
    counts.append(n)
  return counts, kinds


def _examples(files: Sequence[str], shape: str, keep) -> Iterator[dict[str, str]]:
  i = 0
  for path in files:
    for where, record in records(path):
      if keep(i):
        yield validate_line(record, shape, where)
      i += 1


def build_jsonl_dataset(paths: str | Sequence[str], root: str, name: str, *,
                        shape: str | None = None,
                        splits: Mapping[str, str | Sequence[str]] | None = None,
                        eval_fraction: float = 0.0, seed: int = 0) -> str:
  """Validates JSONL files and writes them as the TFDS dataset ``root/name``.

  Args:
    paths: the ``train`` split's files (a path, a glob or a list), concatenated in order.
    root: the TFDS data directory.
    name: the dataset name (lower-case identifier).
    shape: one of :data:`SHAPES`; None detects it from the first line of the first file.
    splits: more splits from their own files, ``{"eval": "val.jsonl"}`` (same shape).
    eval_fraction: moves this fraction of ``paths``' lines (at least one when > 0, chosen with
      ``seed``, order kept) into an ``eval`` split.
    seed: seed of the eval selection.

  Returns:
    The dataset directory (``root/name/1.0.0``), for :func:`jkd.data.open_split`.

  Raises:
    ValueError: a bad line (file and line named), unknown shape, bad ``eval_fraction``.
    FileNotFoundError: a missing input file.
    FileExistsError: the dataset already exists.
  """
  groups = {"train": expand_paths(paths)}
  for split, files in (splits or {}).items():
    if split in groups or (split == "eval" and eval_fraction > 0):
      raise ValueError(f"split {split!r} is given twice (paths/eval_fraction and splits).")
    groups[split] = expand_paths(files)
  if shape is None:
    where, record = _first_keys(groups["train"][0])
    shape = detect_shape(record.keys(), where)
  elif shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}.")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction must be in [0, 1) (got {eval_fraction}).")

  counts, kinds, sources = {}, {}, []
  for split, files in groups.items():
    per_file, split_kinds = _scan(files, shape)
    for f, is_list in split_kinds.items():
      if kinds.setdefault(f, is_list) != is_list:
        raise ValueError(f"field {f!r} is a list in one split and a string in another; use one"
                         " form in the whole dataset.")
    counts[split] = sum(per_file)
    sources += [{"path": p, "split": split, "lines": n} for p, n in zip(files, per_file)]
    if counts[split] == 0:
      raise ValueError(f"split {split!r} has no examples ({files}).")

  keep = {split: (lambda i: True) for split in groups}
  if eval_fraction > 0:
    n = counts["train"]
    n_eval = max(1, int(math.floor(n * eval_fraction)))
    if n_eval >= n:
      raise ValueError(f"eval_fraction {eval_fraction} of {n} examples leaves no training"
                       " examples; lower it or add data.")
    chosen = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
    keep["train"] = lambda i: i not in chosen
    keep["eval"] = lambda i: i in chosen
    counts["train"], counts["eval"] = n - n_eval, n_eval
    groups["eval"] = groups["train"]

  fields = SHAPES[shape].fields + (DOMAIN,)
  features = {f: store.text_feature() for f in fields}
  metadata = {"shape": shape, "sources": sources, "count": counts,
              "json_fields": sorted(f for f, is_list in kinds.items()
                                    if is_list or shape == "chat"),
              "splits": sorted(groups)}
  return store.write_dataset(
      root, name, features,
      {split: _examples(files, shape, keep[split]) for split, files in groups.items()},
      description=f"JSONL import ({shape})", metadata=metadata)


def main(argv: Sequence[str] | None = None) -> str:
  p = argparse.ArgumentParser(prog="python -m jkd.data.jsonl", description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", required=True, help="JSONL file or glob (repeat)")
  p.add_argument("--eval_input", action="append", default=[], help="files of an 'eval' split")
  p.add_argument("--root", required=True, help="TFDS data directory")
  p.add_argument("--name", required=True, help="dataset name")
  p.add_argument("--shape", choices=list(SHAPES), default=None)
  p.add_argument("--eval_fraction", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  path = build_jsonl_dataset(a.input, a.root, a.name, shape=a.shape,
                             splits={"eval": a.eval_input} if a.eval_input else None,
                             eval_fraction=a.eval_fraction, seed=a.seed)
  print(path)
  return path


if __name__ == "__main__":
  errors.run_main(main)
