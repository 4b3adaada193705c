"""The CPU task of ``configs/arte.py``: a target the student must learn, and a teacher that
knows it and something else.

Texts are letter chains (character tokenizer, :func:`jkd.data.char_tokenizer`): the *target*
chain walks ``abcdefgh`` and the *off-target* chain ``stuvwxyz``, each step moving one letter
on (probability ``0.7``) or three (cyclically). The tiny teacher is trained first
(:func:`train_teacher`, seconds) on answers that are either chain with equal probability, the
prompt saying nothing about which: its drafts are half useful to a student who is evaluated on
the target chain. ARTE's student signal should prefer the target drafts, DPO should make the
teacher write them more often, and a student distilled on the tuned teacher's corpus should
reach a lower NLL on held-out target chains than one distilled on the untuned teacher's corpus
(tests/test_arte.py).

:func:`write_cpu_task` writes the prompts, the target validation and eval sets and the
trained teacher (a Hugging Face directory), and returns the config overrides that use them.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

#: The target chain's letters and the off-target chain's.
TARGET, OFF_TARGET = "abcdefgh", "stuvwxyz"


def chain(rng: np.random.Generator, letters: str, length: int) -> str:
  """A letter chain: a uniform first letter, then one on (p 0.7) or three on, cyclically.

  >>> chain(np.random.default_rng(0), "abcdefgh", 6)
  'ghabeh'
  """
  i = int(rng.integers(len(letters)))
  out = [letters[i]]
  for _ in range(length - 1):
    i = (i + (1 if rng.random() < 0.7 else 3)) % len(letters)
    out.append(letters[i])
  return "".join(out)


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
  with open(path + ".tmp", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  os.replace(path + ".tmp", path)
  return path


def _prompt(i: int) -> str:
  return f"q{i % 100:02d}"


def train_teacher(c, workdir: str, *, examples: int = 512, steps: int = 200,
                  length: int = 12) -> str:
  """Trains the tiny teacher on a 50/50 mixture of target and off-target answers and saves it
  as a Hugging Face directory (``workdir/teacher``, reused when there); returns its path.

  The training is a jkd run (:func:`jkd.train.train`, in ``workdir/teacher_run``): a random
  model of ``c.teacher.model``'s shape, cross-entropy on the answers, ``steps`` steps of 16.
  """
  from jkd import models  # noqa: PLC0415  (config files import this module lazily)
  from jkd.data import examples as examples_lib  # noqa: PLC0415
  from jkd.data import model_spec  # noqa: PLC0415
  from jkd.train import loop  # noqa: PLC0415
  from jkd.train.config import default_config  # noqa: PLC0415

  out = os.path.join(workdir, "teacher")
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  tokenizer = model_spec.char_tokenizer(int(c.teacher.model.vocab_size))
  rng = np.random.default_rng(1)
  rows = []
  for i in range(examples):
    letters = TARGET if rng.random() < 0.5 else OFF_TARGET
    ex = examples_lib.tokenize_example(
        {"prompt": _prompt(int(rng.integers(100))), "completion": chain(rng, letters, length)},
        tokenizer, shape="prompt_completion", seq_len=int(c.data.seq_len))
    rows.append(examples_lib.pad_example(ex, int(c.data.seq_len)))
  data = os.path.join(workdir, "teacher_data.npz")
  np.savez(data, **{k: np.stack([r[k] for r in rows]) for k in ("tokens", "labels",
                                                                "loss_mask")})
  t = default_config()
  t.teacher.source = "random"
  t.teacher.model.update(dict(c.teacher.model))
  t.teacher.online = False
  t.student.source = "random"
  t.objective = {"ce": {"term": "cross_entropy", "weight": 1.0}}
  t.optimizer.update(dict(lr=1e-2, warmup_steps=10, weight_decay=0.0, end_lr_ratio=0.1))
  t.data.update(dict(source="npz", path=data, seq_len=int(c.data.seq_len), batch_size=16))
  t.train.update(dict(steps=steps, log_every=50, progress_bar=False,
                      peak_tflops_per_device=1.0))
  t.eval.update(dict(every=0))
  t.checkpoint.update(dict(every=0, keep=1, async_save=False))
  result = loop.train(t, os.path.join(workdir, "teacher_run"))
  config = models.ModelConfig(**dict(t.teacher.model))
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  models.save_hf(tmp, result["state"].params, config, tokenizer=tokenizer)
  os.replace(tmp, out)
  return out


def write_cpu_task(c, workdir: str, *, prompts: int = 64, validation: int = 16,
                   evaluation: int = 32, length: int = 12) -> dict[str, Any]:
  """The files of the CPU variant and the overrides that use them.

  Args:
    c: the variant's config (its ``teacher.model`` shape and ``data.seq_len``).
    workdir: where the files go (created; reused when there).
    prompts: prompts ``q00``... (ids ``p000``...), of which ``corpus.holdout_every`` are held
      out.
    validation, evaluation: target chains in the validation (scoring) and eval sets.
    length: letters per answer.

  Returns:
    ``{"teacher.source": "hf:<dir>", "corpus.prompts", "arte.validation", "arte.eval"}``.
  """
  workdir = os.path.expanduser(workdir)
  os.makedirs(workdir, exist_ok=True)
  rng = np.random.default_rng(2)
  prompt_path = _write_jsonl(os.path.join(workdir, "prompts.jsonl"), [
      {"id": f"p{i:03d}", "prompt": _prompt(i)} for i in range(prompts)])
  val_path, eval_path = (
      _write_jsonl(os.path.join(workdir, name), [
          {"prompt": _prompt(int(rng.integers(100))), "completion": chain(rng, TARGET, length)}
          for _ in range(n)])
      for name, n in (("validation.jsonl", validation), ("eval.jsonl", evaluation)))
  teacher = train_teacher(c, workdir, length=length)
  return {"teacher.source": f"hf:{teacher}", "corpus.prompts": prompt_path,
          "arte.validation": val_path, "arte.eval": eval_path}
