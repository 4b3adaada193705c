"""What a user meets when a run fails: one ``error:`` line and a documented exit code, for bad
command lines and configs, a changed config on resume, a full or read-only checkpoint disk, a
SIGTERM while the corpus is written; and the step-0 evaluation written once, the NaN guard
naming what overflowed.

Runs are real ``python -m jkd.train`` processes on configs/kd_tiny.py (the helpers of
test_train_loop.py). The disk tests mount a small tmpfs or a read-only bind mount, which needs
root: they are skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd import data
from jkd import losses
from jkd import models
from jkd.train import checkpoint as ckpt_lib
from jkd import errors
from jkd.train import loop
from jkd.train import resume
from jkd.train.step import init_state, make_train_step
from jkd.train.writer import read_metrics
from test_train_loop import (CONFIG, ROOT, checkpoint_steps, finish, shared,  # noqa: F401
                             snapshot, start, tiny_config, wait_for)


def error_text(code: int, err: str, expected: int) -> str:
  """The ``error: ...`` message (checked to be the only one, with no traceback)."""
  assert code == expected, err[-3000:]
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
  starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error: ")]
  assert len(starts) == 1, err[-3000:]
  return "\n".join(err.splitlines()[starts[0]:])


# -- bad command lines and configs: exit 2, nothing written ---------------------------------------

@pytest.mark.parametrize("args, devices, message", [
    (["--config.data.batch_size=6"], 4,
     r"data.batch_size 6 does not split over the 4 devices .* make it a multiple of 4 \(e.g. 8\)"),
    (["--config.optimizer.lrr=1"], 1, r'--config.optimizer.lrr: no such config key. Did you mean "lr"'),
    (["--config.train.steps=1.5"], 1, r"--config.train.steps=1.5: invalid literal for int"),
    (["--config.optimizer.lr=-1"], 1, r"optimizer.lr must be a positive finite number"),
    (["--config.mesh.shape=(3,1,1)"], 1, r"mesh shape \(3, 1, 1\) needs 3 devices but 1 are"),
    (["--config.data.source=npz", "--config.data.path=/nonexistent/train.npz"], 1,
     r"/nonexistent/train.npz"),
    (["--allow_config_change=optimizer.lrr"], 1, r"--allow_config_change names \['optimizer.lrr'\]"),
    (["surplus"], 1, r"unexpected arguments: \['surplus'\]"),
    (["--config.data.seq_len=128"], 1,
     r"data.seq_len 128 is longer than the teacher's max_position_embeddings \(64\)"),
    (["--config.student.every=5"], 1, r"student.every must be in \[1, 4\]"),
    (["--config.student.source=prune", "--config.student.prune.num_layers=9"], 1,
     r"student.prune: num_layers=9 must be an int in \[1, 4\] \(the teacher's 4\)"),
    (["--config.checkpoint.keep=0"], 1, r"checkpoint.keep must be >= 1 \(got 0\)"),
    (["--config.optimizer.warmup_steps=-1"], 1, r"optimizer.warmup_steps must be >= 0"),
    (["--config.optimizer.b2=1"], 1, r"optimizer.b2 must be in \[0, 1\) \(got 1.0\)"),
    (["--config.data.shape=nope"], 1, r"data.shape must be one of \[.*\] \(got 'nope'\)"),
    (["--config.onpolicy.mode=gkd"], 1,
     r"--config.onpolicy.mode: no such config key .* optional section 'onpolicy'"),
    # Found on the first batch, which is read before the workdir is written.
    (["--config.teacher.online=False"], 1, r"teacher.online=False: loss term 'kd' needs"),
])
def test_bad_input_is_one_line_and_writes_nothing(shared, tmp_path, args, devices, message):
  workdir = tmp_path / "run"
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices > 1 else None
  code, _, err = finish(start(shared, workdir, *args, env=env))
  assert re.search(message, error_text(code, err, errors.EXIT_INPUT))
  assert not workdir.exists()


@pytest.mark.parametrize("config, message", [
    (CONFIG + ":nope", r"--config=.*kd_tiny.py:nope: ValueError: unknown variant 'nope'"),
    ("/nonexistent/config.py", r"--config: \[Errno 2\] No such file or directory"),
])
def test_bad_config_file_is_one_line(shared, tmp_path, config, message):
  code, _, err = finish(start(shared, tmp_path, python_args=[
      "-m", "jkd.train", "--config", config, "--workdir", str(tmp_path / "run")]))
  assert re.search(message, error_text(code, err, errors.EXIT_INPUT))


def test_bad_data_files_are_one_line_naming_the_file(shared, tmp_path):
  """An .npz whose labels and tokens differ in length; a prompts file with a non-UTF-8 line."""
  npz = tmp_path / "train.npz"
  np.savez(npz, tokens=np.zeros((8, 16), np.int32), labels=np.zeros((8, 15), np.int32))
  code, _, err = finish(start(shared, tmp_path / "run", "--config.data.source=npz",
                              f"--config.data.path={npz}"))
  text = error_text(code, err, errors.EXIT_INPUT)
  assert f"{npz}: 'labels' has shape (8, 15) but 'tokens' has shape (8, 16)" in text, text
  assert not (tmp_path / "run").exists()

  prompts = tmp_path / "prompts.jsonl"
  prompts.write_bytes(b'{"prompt": "Name a colour."}\n{"prompt": "caf\xe9"}\n')
  demo = os.path.join(ROOT, "configs", "demo.py") + ":tiny"
  code, _, err = finish(start(shared, tmp_path, python_args=[
      "-m", "jkd.train", "--config", demo, "--workdir", str(tmp_path / "run2"),
      f"--config.corpus.prompts={prompts}"]))
  text = error_text(code, err, errors.EXIT_INPUT)
  assert f"{prompts}:2: not UTF-8 text (byte 0xe9" in text, text
  assert not (tmp_path / "run2").exists()


def test_unreadable_teacher_weights_are_one_line_before_the_workdir(shared, tmp_path):
  """The teacher's config reads, its weights do not (an interrupted download)."""
  teacher = tmp_path / "teacher"
  shutil.copytree(os.path.join(ROOT, "tests", "data", "tiny_llama"), teacher)
  (teacher / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
  code, _, err = finish(start(shared, tmp_path / "run", f"--config.teacher.source=hf:{teacher}",
                              "--config.student.every=1"))
  text = error_text(code, err, errors.EXIT_INPUT)
  assert f"{teacher / 'model.safetensors'}: not a readable safetensors file" in text, text
  assert not (tmp_path / "run").exists()


def test_a_config_file_that_returns_no_config(shared, tmp_path):
  bad = tmp_path / "plain_dict.py"
  bad.write_text("def get_config(arg=None):\n  return {'seed': 0}\n")
  code, _, err = finish(start(shared, tmp_path, python_args=[
      "-m", "jkd.train", "--config", str(bad), "--workdir", str(tmp_path / "run")]))
  assert "get_config() returned a dict, not an ml_collections.ConfigDict" in error_text(
      code, err, errors.EXIT_INPUT)


def test_traceback_on_request(shared, tmp_path):
  code, _, err = finish(start(shared, tmp_path / "run", "--config.optimizer.lr=-1",
                              env={"JKD_TRACEBACK": "1"}))
  assert code == errors.EXIT_INPUT
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: optimizer.lr")


# -- a changed config on resume -------------------------------------------------------------------

def test_changed_config_is_refused_unless_allowed(shared, tmp_path):
  workdir = tmp_path / "run"
  code, _, err = finish(start(shared, workdir, "--config.train.steps=8"))
  assert code == 0, err[-3000:]
  before = snapshot(workdir)

  # Refused: each changed key with its old and new value; nothing in the workdir changes.
  code, _, err = finish(start(shared, workdir, "--config.train.steps=12",
                              "--config.optimizer.lr=0.001", "--config.eval.every=4"))
  text = error_text(code, err, errors.EXIT_CHECKPOINT)
  assert "optimizer.lr: 0.003 -> 0.001" in text and "train.steps: 8 -> 12" in text, text
  assert "eval.every" not in text  # Free: it does not change what the run computes.
  assert "--allow_config_change=optimizer.lr,train.steps" in text, text
  assert snapshot(workdir) == before

  # Free keys only: accepted without a flag (the run is already at its last step).
  code, out, err = finish(start(shared, workdir, "--config.train.steps=8",
                                "--config.train.log_every=2", "--config.checkpoint.keep=2"))
  assert code == 0 and out.strip().endswith("done at step 8"), err[-3000:]

  # Allowed: the run continues; config.json describes it; the history records each resume.
  code, out, err = finish(start(shared, workdir, "--config.train.steps=12",
                                "--config.optimizer.lr=0.001",
                                "--allow_config_change=optimizer.lr,train"))
  assert code == 0 and out.strip().endswith("done at step 12"), err[-3000:]
  assert "with config changes" in err and "optimizer.lr: 0.003 -> 0.001" in err
  assert checkpoint_steps(workdir)[-1] == 12
  assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 0.001
  history = [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]
  assert [h["step"] for h in history] == [8, 8]
  assert history[0]["changes"] == {"checkpoint.keep": [3, 2], "train.log_every": [1, 2]}
  assert history[0]["allowed"] == []
  assert history[1]["changes"]["optimizer.lr"] == [0.003, 0.001]
  assert history[1]["changes"]["train.steps"] == [8, 12]
  assert history[1]["allowed"] == ["optimizer.lr", "train"]


def test_resume_rules():
  base = {"seed": 0, "optimizer": {"lr": 1.0, "b1": 0.9}, "eval": {"every": 8},
          "data": {"source": "synthetic"}, "mesh": {"shape": [-1, 1, 1]}}
  changed = json.loads(json.dumps(base))
  changed["mesh"]["shape"] = [1, 1, 1]
  changed["eval"]["every"] = 4
  assert resume.check_resume(base, changed, where="w") == {
      "eval.every": (8, 4), "mesh.shape": ([-1, 1, 1], [1, 1, 1])}
  # DDK reads the evaluations: their frequency changes the data.
  ddk_old = dict(base, data={"source": "domains"})
  ddk_new = dict(changed, data={"source": "domains"})
  with pytest.raises(errors.ConfigChangedError, match=r"eval.every: 8 -> 4"):
    resume.check_resume(ddk_old, ddk_new, where="w")
  assert "eval.every" in resume.check_resume(ddk_old, ddk_new, where="w", allow=["eval"])
  # A new section or key shows as absent before.
  added = dict(base, ddk={"alpha": 0.5})
  with pytest.raises(errors.ConfigChangedError, match=r"ddk.alpha: <absent> -> 0.5"):
    resume.check_resume(base, added, where="w")
  with pytest.raises(ValueError, match=r"\['optimiser'\], which are not keys"):
    resume.check_resume(base, base, where="w", allow=["optimiser"])


# -- full and read-only checkpoint disks: exit 5 within seconds -----------------------------------

@contextlib.contextmanager
def mounted(target, *how):
  """``mount *how target`` (skips the test when it cannot mount), unmounted after."""
  os.makedirs(target, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("mounting a small or read-only file system needs root")
  done = subprocess.run(["mount", *how, str(target)], capture_output=True, text=True,
                        check=False)
  if done.returncode:
    pytest.skip(f"cannot mount here: {done.stderr.strip()}")
  try:
    yield target
  finally:
    subprocess.run(["umount", "-l", str(target)], check=False)


def complete_steps(directory) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()
                and os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def test_full_disk_stops_within_seconds_and_keeps_the_saved_checkpoints(shared, tmp_path):
  workdir = tmp_path / "run"
  with mounted(workdir / "checkpoints", "-t", "tmpfs", "-o", "size=1600k", "tmpfs") as ckdir:
    t0 = time.monotonic()
    code, _, err = finish(start(shared, workdir), timeout=120)
    seconds = time.monotonic() - t0
    text = error_text(code, err, errors.EXIT_WRITE)
    assert "cannot write checkpoint" in text and str(ckdir) in text, text
    assert "[Errno 28] No space left on device" in text, text
    left = os.listdir(ckdir)
    assert not [n for n in left if n.endswith(ckpt_lib.TMP_SUFFIX)], left
    kept = complete_steps(ckdir)
    assert kept, left  # Some checkpoints fitted, and they are intact: the last one restores.
    assert f"({', '.join(map(str, kept))}) are intact" in text, text
    assert sorted(int(n) for n in left if n.isdigit()) == kept
    checkpointer = ckpt_lib.Checkpointer(str(ckdir))
    assert checkpointer.latest_step() == kept[-1]
    checkpointer.close()
  assert seconds < 60, seconds


def test_failed_write_during_a_save_removes_the_partial_step(tmp_path):
  """The space check passes (disabled here) and the write itself fails: the asynchronous save's
  error becomes a SaveError naming errno 28, and its partial directory is removed."""
  with mounted(tmp_path / "small", "-t", "tmpfs", "-o", "size=300k", "tmpfs") as small:
    checkpointer = ckpt_lib.Checkpointer(str(small / "ck"))
    checkpointer.check_space = lambda step, nbytes: None
    state = {"w": jax.random.normal(jax.random.key(0), (256, 1024))}  # 1 MiB, incompressible
    with pytest.raises(errors.SaveError) as e:
      checkpointer.save(1, state, {"position": 0})
      checkpointer.wait()
    assert e.value.errno == errno.ENOSPC and "cannot write checkpoint 1" in str(e.value)
    assert os.listdir(small / "ck") == []
    checkpointer.close()


def test_read_only_checkpoint_folder_stops_within_seconds(shared, tmp_path):
  workdir, source = tmp_path / "run", tmp_path / "source"
  source.mkdir()
  with mounted(workdir / "checkpoints", "--bind", str(source)) as ckdir:
    subprocess.run(["mount", "-o", "remount,ro,bind", str(ckdir)], check=True)
    t0 = time.monotonic()
    code, _, err = finish(start(shared, workdir), timeout=120)
    seconds = time.monotonic() - t0
    text = error_text(code, err, errors.EXIT_WRITE)
    assert f"cannot write checkpoint 4 to {ckdir}: [Errno 30] Read-only file system" in text
    assert "no checkpoint was saved yet" in text, text
  assert seconds < 60, seconds
  assert os.listdir(source) == []


# -- SIGTERM before the first step ----------------------------------------------------------------

def test_sigterm_while_the_corpus_is_written_exits_0_and_keeps_it(shared, tmp_path):
  workdir = tmp_path / "run"
  demo = os.path.join(ROOT, "configs", "demo.py") + ":tiny"
  proc = start(shared, workdir, python_args=[
      "-m", "jkd.train", "--config", demo, "--workdir", str(workdir),
      "--config.train.progress_bar=False", "--config.corpus.limit=0",
      "--config.corpus.batch_size=1", "--config.corpus.max_new_tokens=32"])
  partial = workdir / "data" / "corpus_train.partial"

  def answered() -> int:
    parts = list(partial.glob("part-*")) if partial.exists() else []
    return sum(len(p.read_text().splitlines()) for p in parts)

  wait_for(proc, lambda: answered() >= 2, "two answered prompts")
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == 0, err[-3000:]
  assert out.strip().endswith("preempted at step 0"), out[-500:]
  assert answered() >= 2  # Kept for the next run, which goes on from them.
  assert not (workdir / "checkpoints").exists()


# -- the step-0 evaluation once; what overflowed --------------------------------------------------

class Crashes(data.ArraySource):
  """Raises after three batches: a run killed before its first checkpoint."""
  served = 0

  def __next__(self):
    self.served += 1
    if self.served > 3:
      raise RuntimeError("simulated crash")
    return super().__next__()


def test_step0_evaluation_is_written_once_after_a_restart(tmp_path):
  cfg = tiny_config(eval__at_start=True, train__steps=6, checkpoint__every=0, eval__every=3)
  d = cfg.data
  ex = data.synthetic_lm_examples(d.num_examples + d.eval_examples, d.seq_len,
                                  cfg.teacher.model.vocab_size, seed=d.seed)
  evals = lambda: data.ArraySource({k: v[d.num_examples:] for k, v in ex.items()},  # noqa: E731
                                   d.batch_size, shuffle=False)
  train = lambda cls: cls({k: v[:d.num_examples] for k, v in ex.items()},  # noqa: E731
                          d.batch_size, seed=d.seed)
  with pytest.raises(RuntimeError, match="simulated crash"):
    loop.train(cfg, str(tmp_path), train_source=train(Crashes), eval_source=evals())
  assert [m["step"] for m in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 3]
  loop.train(cfg, str(tmp_path), train_source=train(data.ArraySource), eval_source=evals())
  steps = [m["step"] for m in read_metrics(str(tmp_path))]
  assert steps == [0, 1, 2, 3, 3, 4, 5, 6, 6], steps


def test_nonfinite_update_is_named():
  """A finite loss and gradient with a NaN update (a NaN learning rate) is reported as such."""
  cfg = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1)
  params = models.init_params(cfg, jax.random.key(0))
  objective = losses.build_objective({"ce": {"term": "cross_entropy", "weight": 1.0}})
  optimizer = optax.sgd(learning_rate=lambda step: jnp.nan)
  state = init_state(params, optimizer, objective)
  step = jax.jit(make_train_step(student_config=cfg, teacher_config=None, objective=objective,
                                 optimizer=optimizer, schedule=lambda s: 0.0))
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  _, metrics = step(state, {"tokens": tokens, "labels": np.roll(tokens, -1, 1)},
                    jax.random.key(1), None)
  assert float(metrics["train/finite"]) == 0.0
  assert float(metrics["train/nonfinite"]) == 4.0  # Not the loss (1), not the gradient (2).
