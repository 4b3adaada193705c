"""jkd.data.jsonl: JSONL -> TFDS, shapes, splits, and errors that name the file and line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jkd.data import build_jsonl_dataset, open_split, read_metadata
from jkd.data import jsonl


def write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def read_all(path, split):
  src = open_split(path, split)
  return [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
CASES = {
    "text": ({"text": "a b", "domain": "web"}, {"text": "a b", "domain": "web"}),
    "prompt_completion": ({"prompt": "", "completion": "c"},
                          {"prompt": "", "completion": "c", "domain": ""}),
    "chat": ({"messages": CHAT, "id": 7}, {"messages": json.dumps(CHAT), "domain": ""}),
    "preference": ({"prompt": "p", "chosen": "x", "rejected": "y"},
                   {"prompt": "p", "chosen": "x", "rejected": "y", "domain": ""}),
}


@pytest.mark.parametrize("shape", list(CASES))
def test_each_shape_round_trips_with_metadata(tmp_path, shape):
  line, stored = CASES[shape]
  a = write(tmp_path / "a.jsonl", [line, line, ""])  # a blank line is ignored
  b = write(tmp_path / "b.jsonl", [line])
  path = build_jsonl_dataset([a, b], str(tmp_path / "root"), "ds")
  assert read_all(path, "train") == [stored] * 3
  meta = read_metadata(path)
  assert meta["shape"] == shape and meta["count"] == {"train": 3}
  assert [(s["path"], s["lines"]) for s in meta["sources"]] == [(a, 2), (b, 1)]
  assert meta["json_fields"] == (["messages"] if shape == "chat" else [])


def test_preference_accepts_message_lists_stored_as_json(tmp_path):
  line = {"prompt": CHAT[:1], "chosen": CHAT[1:], "rejected": [
      {"role": "assistant", "content": "no"}]}
  path = build_jsonl_dataset(write(tmp_path / "p.jsonl", [line]), str(tmp_path), "p")
  (got,) = read_all(path, "train")
  assert {k: json.loads(got[k]) for k in ("prompt", "chosen", "rejected")} == {
      k: line[k] for k in ("prompt", "chosen", "rejected")}
  assert read_metadata(path)["json_fields"] == ["chosen", "prompt", "rejected"]


def test_eval_fraction_and_explicit_splits(tmp_path):
  lines = [{"text": f"doc {i}"} for i in range(20)]
  f = write(tmp_path / "t.jsonl", lines)
  path = build_jsonl_dataset(f, str(tmp_path), "frac", eval_fraction=0.25, seed=3)
  train, evals = read_all(path, "train"), read_all(path, "eval")
  want_eval = sorted(np.random.default_rng(3).permutation(20)[:5].tolist())
  assert [int(e["text"].split()[1]) for e in evals] == want_eval
  assert sorted(int(e["text"].split()[1]) for e in train + evals) == list(range(20))
  assert read_metadata(path)["count"] == {"train": 15, "eval": 5}
  v = write(tmp_path / "v.jsonl", lines[:2])
  path = build_jsonl_dataset(f, str(tmp_path), "explicit", splits={"validation": v})
  assert len(open_split(path, "train")) == 20 and len(open_split(path, "validation")) == 2


def test_cli_and_glob(tmp_path, capsys):
  for i in range(2):
    write(tmp_path / f"part{i}.jsonl", [{"prompt": "q", "completion": f"a{i}"}])
  path = jsonl.main(["--input", str(tmp_path / "part*.jsonl"), "--root", str(tmp_path / "r"),
                     "--name", "cli", "--shape", "prompt_completion"])
  assert capsys.readouterr().out.strip() == path
  assert [e["completion"] for e in read_all(path, "train")] == ["a0", "a1"]
  with pytest.raises(FileExistsError, match="already exists"):
    jsonl.main(["--input", str(tmp_path / "part0.jsonl"), "--root", str(tmp_path / "r"),
                "--name", "cli"])


GOOD = {"prompt": "p", "completion": "c"}
ERRORS = [
    # (lines, shape, message pattern; "{where}" is replaced by the bad line's file:line)
    ([GOOD, "{not json"], None, "{where}: invalid JSON"),
    ([GOOD, {"prompt": "p"}], None, r"{where}: missing field\(s\) \['completion'\]; a"
     r" 'prompt_completion' line needs \['prompt', 'completion'\]"),
    ([GOOD, {"prompt": "p", "completion": 3}], None, "{where}: field 'completion' must be a"
     " string, got int"),
    ([GOOD, {"prompt": "p", "completion": "  "}], None, "{where}: field 'completion' is empty"),
    ([GOOD, {"text": "t"}], None, "{where}: mixed shapes: this line is a 'text' example but the"
     " dataset is 'prompt_completion'"),
    ([GOOD, {"prompt": "p", "completion": "c", "domain": 1}], None,
     "{where}: field 'domain' must be a string"),
    ([GOOD, [1, 2]], None, "{where}: a line must be a JSON object"),
    ([{"messages": [{"role": "user", "content": "x"}]}], None,
     "{where}: 'messages' has no non-empty 'assistant' message"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], None, r"{where}: messages\[0\] has"
     " role 'robot'"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"},
      {"prompt": "p", "chosen": CHAT[1:], "rejected": "b"}], None,
     "{where}: field 'chosen' is a list here but a string on earlier lines"),
    ([{"foo": 1}], None, r"{where}: keys \['foo'\] match no JSONL shape"),
    ([{"text": "t"}], "chat", "{where}: mixed shapes: this line is a 'text' example but the"
     " dataset is 'chat'"),
    ([{"messages": CHAT, "text": "x"}], None, r"{where}: keys \['messages', 'text'\] match"
     r" several shapes \['text', 'chat'\]; pass the shape"),
    ([{"prompt": "p"}], "prompt_completion", r"{where}: missing field\(s\) \['completion'\]"),
]


@pytest.mark.parametrize("lines,shape,pattern", ERRORS)
def test_bad_lines_name_file_and_line(tmp_path, lines, shape, pattern):
  f = write(tmp_path / "bad.jsonl", [""] + lines)  # line 1 blank: line numbers are file lines
  where = re.escape(f"{f}:{len(lines) + 1}")
  with pytest.raises(ValueError, match=pattern.replace("{where}", where)):
    build_jsonl_dataset(f, str(tmp_path), "bad", shape=shape)


def test_bad_arguments(tmp_path):
  f = write(tmp_path / "a.jsonl", [GOOD])
  with pytest.raises(ValueError, match="unknown shape 'tweets'"):
    build_jsonl_dataset(f, str(tmp_path), "x", shape="tweets")
  with pytest.raises(ValueError, match="leaves no training examples"):
    build_jsonl_dataset(f, str(tmp_path), "x", eval_fraction=0.5)
  with pytest.raises(FileNotFoundError, match="no JSONL file at"):
    build_jsonl_dataset(str(tmp_path / "missing.jsonl"), str(tmp_path), "x")
  empty = write(tmp_path / "empty.jsonl", [""])
  with pytest.raises(ValueError, match="holds no examples"):
    build_jsonl_dataset(empty, str(tmp_path), "x")
