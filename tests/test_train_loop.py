"""The training engine end to end on configs/kd_tiny.py: learning, metrics, exact resume after
SIGKILL (also mid-save) and SIGTERM, config typos, foreign and corrupted checkpoints, NaN stops.

Runs are real `python -m jkd.train` processes. They share a persistent JAX compilation cache
and compile with LLVM's backend optimisations off (no change to IEEE float semantics, all runs
alike), so only the first run compiles: the others take a few seconds each. The uninterrupted
reference run is made once (under a file lock, shared by pytest-xdist workers).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from jkd.train import checkpoint as ckpt_lib
from jkd.train import loop
from jkd.errors import CheckpointMismatchError, ConfigChangedError
from jkd.train.writer import read_metrics
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "kd_tiny.py")
STEPS, CKPT_EVERY = 24, 4  # configs/kd_tiny.py


def tiny_config(**overrides):
  cfg = load_config("kd_tiny")
  cfg.train.progress_bar = False
  for key, value in overrides.items():
    section, name = key.split("__")
    cfg[section][name] = value
  return cfg


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A directory shared by the xdist workers (the compilation cache, the reference run)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def env_for(shared):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_backend_optimization_level=0").strip(),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return env


def start(shared, workdir, *args, python_args=None, env=None) -> subprocess.Popen:
  """``python -m jkd.train`` on the tiny config (or ``python *python_args``), in the background.

  ``env`` adds variables; its ``XLA_FLAGS`` are appended to the shared ones.
  """
  cmd = python_args or ["-m", "jkd.train", "--config", CONFIG, "--workdir", str(workdir),
                        "--config.train.progress_bar=False", *args]
  full_env = env_for(shared)
  for key, value in (env or {}).items():
    full_env[key] = f"{full_env[key]} {value}" if key == "XLA_FLAGS" else value
  # Output to files, not pipes: a child never blocks on a full pipe while a test polls.
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=full_env, stdout=out,
                          stderr=err, text=True)
  proc.output_files = (out, err)
  return proc


def outputs(proc: subprocess.Popen) -> tuple[str, str]:
  texts = []
  for f in proc.output_files:
    f.seek(0)
    texts.append(f.read())
  return texts[0], texts[1]


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return (proc.returncode, *outputs(proc))


def run_to_end(shared, workdir, *args, env=None) -> str:
  code, out, err = finish(start(shared, workdir, *args, env=env))
  assert code == 0, err[-3000:]
  return out


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 120) -> None:
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (code {proc.returncode}) before {what}:\n"
                           + outputs(proc)[1][-3000:])
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.001)


def last_step(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = [json.loads(line) for line in f if line.endswith("\n")]
  return max((m["step"] for m in lines), default=0)


def exact(workdir) -> list[dict]:
  """metrics.jsonl without the timing metrics (perf/), which differ between runs."""
  return [{k: v for k, v in m.items() if not k.startswith("perf/")}
          for m in read_metrics(str(workdir))]


def snapshot(directory) -> dict[str, tuple]:
  """Every file under ``directory`` with its size, mtime and content hash."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def reference(shared):
  """The uninterrupted run of configs/kd_tiny.py (made once, shared by the xdist workers)."""
  workdir = shared / "reference"
  with open(shared / "reference.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (shared / "reference.done").exists():
      shutil.rmtree(workdir, ignore_errors=True)
      out = run_to_end(shared, workdir)
      (shared / "reference.done").write_text(out)
  return workdir


def copy_run(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  return workdir


# ---------------------------------------------------------------------------------------------

def test_loss_goes_down_and_outputs_written(reference):
  lines = read_metrics(str(reference))
  train = [m for m in lines if "loss/total" in m]
  evals = [m for m in lines if "eval/kl_forward" in m]
  assert [m["step"] for m in train] == list(range(1, STEPS + 1))
  assert [m["step"] for m in evals] == [8, 16, 24]
  first, last = np.mean([m["loss/total"] for m in train[:3]]), np.mean(
      [m["loss/total"] for m in train[-3:]])
  assert last < first - 0.01, (first, last)
  assert evals[-1]["eval/student_nll"] < evals[0]["eval/student_nll"]
  assert all(m["train/finite"] == 1.0 and m["train/skipped"] == 0.0 for m in train)
  assert all(0 < m["perf/mfu"] and m["perf/tokens_per_s"] > 0 for m in train[1:])
  for key in ("eval/student_ppl", "eval/teacher_nll", "eval/top1_agreement",
              "eval/student_ece", "eval/teacher_ece"):
    assert np.isfinite(evals[-1][key]), key
  assert checkpoint_steps(reference) == [16, 20, 24]  # keep=3
  assert os.listdir(reference / "tensorboard")
  saved = json.loads((reference / "config.json").read_text())
  assert saved["train"]["steps"] == STEPS and saved["teacher"]["source"] == "random"
  printed = (reference.parent / "reference.done").read_text()  # the run's stdout
  assert printed.startswith("{") and '"source": "random"' in printed  # the resolved config
  assert printed.strip().endswith("done at step 24")


def test_random_student_variant_of_the_config(shared, tmp_path):
  workdir = tmp_path / "run"
  code, out, err = finish(start(shared, workdir, python_args=[
      "-m", "jkd.train", "--config", f"{CONFIG}:random", "--workdir", str(workdir),
      "--config.train.progress_bar=False", "--config.train.steps=4"]))
  assert code == 0, err[-3000:]
  assert out.strip().endswith("done at step 4")
  assert '"num_layers": 1' in out  # the random student's override, in the printed config
  lines = read_metrics(str(workdir))
  assert [m["step"] for m in lines if "loss/total" in m] == [1, 2, 3, 4]
  assert all(np.isfinite(m["loss/total"]) for m in lines if "loss/total" in m)


def test_sigkill_during_a_save_and_between_saves_resumes_exactly(shared, reference, tmp_path):
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"

  def saving_second():  # the step-8 save has started: its temporary directory exists
    return ckpts.is_dir() and any(n.endswith("orbax-checkpoint-tmp") and n.split(".")[0] != "4"
                                  for n in os.listdir(ckpts))

  # 1. SIGKILL while the second checkpoint is being written.
  proc = start(shared, workdir)
  wait_for(proc, saving_second, "the second checkpoint's save")
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  partial = [n for n in os.listdir(ckpts) if "tmp" in n]
  done = checkpoint_steps(workdir)
  assert 4 in done
  if partial:  # Killed mid-save (nearly always): the partial checkpoint does not count.
    assert all(int(n.split(".")[0]) not in done for n in partial)
  else:  # The save finished just before the kill: the second checkpoint is complete.
    assert max(done) > 4
  checkpointer = ckpt_lib.Checkpointer(str(ckpts))
  assert checkpointer.latest_step() == max(done)
  checkpointer.close()

  # 2. Resume, then SIGKILL between saves.
  resumed_from = max(done)
  proc = start(shared, workdir)
  wait_for(proc, lambda: last_step(workdir) >= resumed_from + CKPT_EVERY + 2,
           f"step {resumed_from + CKPT_EVERY + 2}")
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  assert last_step(workdir) < STEPS

  # 3. Resume to the end: every metric equals the uninterrupted run's, bit for bit.
  run_to_end(shared, workdir)
  assert exact(workdir) == exact(reference)
  assert checkpoint_steps(workdir) == [16, 20, 24]


def test_sigterm_saves_and_exits_cleanly(shared, reference, tmp_path):
  workdir = tmp_path / "run"
  proc = start(shared, workdir)
  wait_for(proc, lambda: last_step(workdir) >= 2, "step 2")
  proc.send_signal(signal.SIGTERM)
  code, out, err = finish(proc)
  assert code == 0, err[-3000:]
  stopped = int(out.strip().splitlines()[-1].split()[-1])
  assert out.strip().endswith(f"preempted at step {stopped}") and 2 <= stopped < STEPS
  assert stopped in checkpoint_steps(workdir)
  assert last_step(workdir) == stopped
  run_to_end(shared, workdir)
  assert exact(workdir) == exact(reference)


def test_config_typo_is_an_error(shared, tmp_path):
  code, _, err = finish(start(shared, tmp_path / "run", "--config.optimizer.lrr=0.1"))
  assert code != 0
  assert "lrr" in err and "Did you mean" in err and "lr" in err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer__lr=float("nan")), "optimizer.lr must be a positive finite number"),
    (dict(train__max_nan_steps=0), "train.max_nan_steps must be >= 1"),
    (dict(checkpoint__best_metric="eval/kl"), "'eval/kl' is not an eval metric"),
    (dict(checkpoint__best_metric="eval/kl_forward", eval__every=3),
     r"make checkpoint.every \(4\) a multiple of eval.every \(3\)"),
])
def test_bad_config_values_are_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    loop.train(tiny_config(**overrides), str(tmp_path / "run"))


def test_other_model_shape_is_an_error_and_leaves_checkpoints(reference, tmp_path):
  workdir = copy_run(reference, tmp_path)
  before = snapshot(workdir / "checkpoints")
  with pytest.raises(ConfigChangedError, match=r"student.every: 2 -> 1\n.*"
                     "--allow_config_change=student.every"):
    loop.train(tiny_config(student__every=1), str(workdir))  # 4 layers instead of 2
  with pytest.raises(CheckpointMismatchError) as e:  # Accepted, the shapes still differ.
    loop.train(tiny_config(student__every=1), str(workdir), allow_config_change=["student"])
  message = str(e.value)
  assert "params/layers/attn/k/kernel: checkpoint (2, 32, 2, 8) vs model (4, 32, 2, 8)" in (
      message), message
  assert str(workdir / "checkpoints" / "24") in message
  assert snapshot(workdir / "checkpoints") == before


@pytest.mark.parametrize("damage", ["garbage_state", "missing_state", "missing_data"])
def test_corrupted_checkpoint_is_an_error_and_left_alone(reference, tmp_path, damage):
  workdir = copy_run(reference, tmp_path)
  step_dir = workdir / "checkpoints" / "24"
  if damage == "garbage_state":
    for root, _, files in os.walk(step_dir / "state"):
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"\x00garbage" * 7)
  else:
    shutil.rmtree(step_dir / damage.split("_")[1])
  before = snapshot(workdir / "checkpoints")
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoints/24 cannot be read .* left untouched"):
    loop.train(tiny_config(), str(workdir))
  assert snapshot(workdir / "checkpoints") == before


NAN_DRIVER = """
import importlib.util, sys
import numpy as np
from jkd import data
from jkd.train import loop
spec = importlib.util.spec_from_file_location("kd_tiny", sys.argv[1])
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
cfg = module.get_config(); cfg.train.progress_bar = False
d = cfg.data
ex = data.synthetic_lm_examples(d.num_examples + d.eval_examples, d.seq_len,
                                cfg.teacher.model.vocab_size, seed=d.seed)

class Poisoned(data.ArraySource):
  # From the 6th batch on, token ids outside the vocabulary: NaN embeddings under jit.
  served = 0
  def __next__(self):
    batch = super().__next__()
    self.served += 1
    if self.served > 5:
      batch = dict(batch, tokens=np.full_like(batch["tokens"], 10**6))
    return batch

train = Poisoned({k: v[:d.num_examples] for k, v in ex.items()}, d.batch_size, seed=d.seed)
evals = data.ArraySource({k: v[d.num_examples:] for k, v in ex.items()}, d.batch_size,
                         shuffle=False)
loop.train(cfg, sys.argv[2], train_source=train, eval_source=evals)
"""


def test_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(shared, reference,
                                                                   tmp_path):
  workdir = tmp_path / "run"
  code, _, err = finish(start(shared, workdir,
                              python_args=["-c", NAN_DRIVER, CONFIG, str(workdir)]))
  assert code != 0
  assert "NonFiniteError: 3 non-finite steps in a row (the loss was NaN/inf;" in err, err[-3000:]
  assert f"the last checkpoint, {workdir / 'checkpoints' / '4'}, is intact" in err
  lines = exact(workdir)
  assert lines[:5] == [m for m in exact(reference) if m["step"] <= 5 and "loss/total" in m]
  assert [(m["step"], m["train/finite"], m["train/skipped"]) for m in lines[5:]] == [
      (6, 0.0, 1.0), (7, 0.0, 2.0), (8, 0.0, 3.0)]
  assert checkpoint_steps(workdir) == [4]  # none saved during the NaN steps (step 8)
  # The last good checkpoint restores, with finite parameters.
  checkpointer = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
  meta = checkpointer._manager.item_metadata(4)["state"]  # noqa: SLF001
  assert meta is not None
  checkpointer.close()
  with ckpt_lib.ocp.PyTreeCheckpointer() as c:
    params = c.restore(str(workdir / "checkpoints" / "4" / "state"))["params"]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_initialize_distributed_reads_the_environment(monkeypatch):
  """No variables: single process. A partial set or an unknown JKD_DISTRIBUTED: clear errors
  (before any attempt to reach a coordinator)."""
  from jkd.train import default_config, initialize_distributed
  cfg = default_config()
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "JKD_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  assert initialize_distributed(cfg) is False
  monkeypatch.setenv("JKD_DISTRIBUTED", "yes")
  with pytest.raises(ValueError, match="JKD_DISTRIBUTED='yes'.*auto"):
    initialize_distributed(cfg)
  monkeypatch.delenv("JKD_DISTRIBUTED")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    initialize_distributed(cfg)
