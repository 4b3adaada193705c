"""Teacher-written corpora: prompt files, completions, and resuming a SIGKILLed job exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jkd import models, sampling
from jkd.data import corpus, open_split, read_metadata
from jkd.data import model_spec
from jkd.data import teacher_cache as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
            num_kv_heads=2, seed=5)
SPEC = "random:" + json.dumps(TINY)

# Runs the CLI but hangs in the second generate call, i.e. after the first batch is on disk.
_HANG_AFTER_FIRST_BATCH = """
import sys, time
from jkd import sampling
from jkd.data import corpus
real, calls = sampling.generate, []
def hang(*args, **kwargs):
  if calls:
    time.sleep(600)
  calls.append(1)
  return real(*args, **kwargs)
sampling.generate = hang
corpus.main(sys.argv[1:])
"""


def _write_prompts(path, n):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about {'ab' * i}x.",
                          "domain": ["writing", "math"][i % 2]}) + "\n")


def _records(path):
  src = open_split(path, "train")
  return [{k: v.decode() for k, v in src[i].items()} for i in range(len(src))]


def _lines(path):
  with open(path) as f:
    return f.read().count("\n")


def test_read_prompts(tmp_path):
  f = tmp_path / "p.jsonl"
  f.write_text('{"id": "a", "prompt": "one", "domain": "x"}\n\n{"prompt": "two"}\n')
  assert corpus.read_prompts(str(f)) == [{"id": "a", "prompt": "one", "domain": "x"},
                                         {"id": "3", "prompt": "two", "domain": ""}]
  f.write_text('{"id": "a", "prompt": "one"}\n{"id": "a", "prompt": "two"}\n')
  with pytest.raises(ValueError, match=rf"{f}:2: prompt id 'a' repeats the id of {f}:1"):
    corpus.read_prompts(str(f))
  f.write_text('{"id": "a", "prompt": "one"}\n{"id": "b", "prompt": "tw\n')
  with pytest.raises(ValueError, match=rf"{f}:2: not valid JSON"):
    corpus.read_prompts(str(f))
  f.write_text('{"id": "a", "text": "one"}\n')
  with pytest.raises(ValueError, match=rf"{f}:1: 'prompt' must be a non-empty string"):
    corpus.read_prompts(str(f))


def test_completion_records_stop_at_eos():
  tok = model_spec.char_tokenizer(128)
  h, i, eos, pad = 44, 77, 1, 0  # "H", "i", <eos>, <pad>
  tokens = np.array([[h, i, eos, pad, pad], [h, i, h, i, h]])
  recs = corpus.completion_records(tokens, np.array([3, 5]), [eos], tok)
  assert recs == [{"completion": "Hi", "n_tokens": 2, "finish_reason": "stop"},
                  {"completion": "HiHiH", "n_tokens": 5, "finish_reason": "length"}]
  # A stop token in the middle of the kept tokens cannot happen; special tokens are skipped.
  assert corpus.completion_records(np.array([[2, h, 3]]), np.array([3]), [eos],
                                   tok)[0]["completion"] == "H"
  assert corpus.default_stop_ids(tok) == [eos]


def test_partial_part_torn_and_corrupt_lines(tmp_path):
  part = tmp_path / "part-00000.jsonl"
  good = json.dumps({"id": "a", "completion": "x"}) + "\n"
  part.write_text(good + '{"id": "b", "compl')
  assert corpus._read_part(str(part)) == [{"id": "a", "completion": "x"}]
  assert part.read_text() == good  # the torn tail is cut, appends start on a clean line
  part.write_text(good + "garbage\n" + good)
  with pytest.raises(ValueError, match=rf"{part}:2: corrupt record"):
    corpus._read_part(str(part))


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, monkeypatch):
  prompts = tmp_path / "prompts.jsonl"
  _write_prompts(prompts, 6)
  args = ["--teacher", SPEC, "--prompts", str(prompts), "--max_new_tokens", "8",
          "--batch_size", "2", "--seed", "3", "--no_progress"]
  out = tmp_path / "resumed"
  part0 = out / "corpus.partial" / "part-00000.jsonl"
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-c", _HANG_AFTER_FIRST_BATCH, *args, "--out",
                           str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 300
    while not (part0.exists() and _lines(part0) >= 2):
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.monotonic() < deadline, "the first batch never reached the disk"
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert _lines(part0) == 2
  with open(part0, "a") as f:  # as if killed in the middle of writing the next record
    f.write('{"id": "p2", "prompt": "Tell me')

  teacher = model_spec.load_model(SPEC)
  with pytest.raises(ValueError, match="started with other options .*temperature"):
    corpus.generate_corpus(str(prompts), str(out), params=teacher.params, config=teacher.config,
                           tokenizer=teacher.tokenizer, max_new_tokens=8, batch_size=2, seed=3,
                           temperature=0.9, progress=False)

  real, calls = sampling.generate, []
  monkeypatch.setattr(sampling, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
  resumed = corpus.main(args + ["--out", str(out)])
  assert len(calls) == 2  # batches 2 and 3 only
  assert not (out / "corpus.partial").exists()
  calls.clear()
  reference = corpus.generate_corpus(str(prompts), str(tmp_path / "straight"),
                                     params=teacher.params, config=teacher.config,
                                     tokenizer=teacher.tokenizer, max_new_tokens=8, batch_size=2,
                                     seed=3, progress=False)
  assert len(calls) == 3
  got, want = _records(resumed), _records(reference)
  assert [r["id"] for r in got] == [f"p{i}" for i in range(6)]
  assert got == want
  assert all(r["completion"] for r in got) and got[1]["domain"] == "math"
  meta = read_metadata(resumed)
  assert (meta["kind"], meta["shape"], meta["count"], meta["seed"]) == (
      "teacher_corpus", "prompt_completion", 6, 3)
  assert meta["teacher"] == SPEC
  assert meta["teacher_fingerprint"] == tc.teacher_fingerprint(teacher.params, teacher.config)
  assert meta["sampling"]["temperature"] == 0.7 and meta["sampling"]["top_p"] == 0.95
  assert sum(meta["finish_reasons"].values()) == 6
  with pytest.raises(FileExistsError, match="a corpus already exists"):
    corpus.main(args + ["--out", str(out)])


@pytest.mark.slow
def test_smollm2_corpus(tmp_path):
  """The real teacher answers 2 prompts with 8 new tokens, through its chat template."""
  gguf = models.smollm2_gguf_path()
  config, params = models.load_gguf(gguf)
  tokenizer = models.load_tokenizer(gguf)
  prompts = [{"id": "a", "prompt": "What is the capital of France?", "domain": "qa"},
             {"id": "b", "prompt": "Name a colour.", "domain": "qa"}]
  path = corpus.generate_corpus(prompts, str(tmp_path), params=params, config=config,
                                tokenizer=tokenizer, max_new_tokens=8, batch_size=2,
                                progress=False, teacher="smollm2")
  got = _records(path)
  assert [r["id"] for r in got] == ["a", "b"]
  # The same sample drawn directly: chat template, key fold_in(key(0), 0), stop at <|im_end|>.
  rows = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                        add_generation_prompt=True)["input_ids"]
          for p in prompts]
  out = sampling.generate(params, rows, config=config, key=jax.random.fold_in(
      jax.random.key(0), 0), max_new_tokens=8, temperature=0.7, top_p=0.95,
                          stop_ids=[tokenizer.eos_token_id])
  for r, toks, n in zip(got, np.asarray(out.tokens), np.asarray(out.lengths)):
    assert r["completion"] == tokenizer.decode(toks[:n], skip_special_tokens=True)
    assert r["completion"].strip()
  assert read_metadata(path)["sampling"]["stop_ids"] == [tokenizer.eos_token_id]
