"""The launchers of launch/: local.sh runs N real processes (2 processes give the metrics of 1; a
failing rank stops the others and is named); tpu_vm.sh and slurm_gpu.sbatch run against stubs of
gcloud, the TPU metadata server (curl), srun and scontrol on PATH, which record what each worker
or rank would get."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from jkd.train.writer import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIG = "configs/kd_tiny.py"
STEPS = ["--config.train.steps=4", "--config.train.progress_bar=False"]
# What a stubbed python reports: its arguments and the environment of a rank.
REPORTED = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JKD_DISTRIBUTED",
            "CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "XLA_FLAGS",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION")


def script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def report_python(path: pathlib.Path) -> pathlib.Path:
  """A stand-in for python that prints its arguments and the REPORTED variables as JSON."""
  code = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ[k]"
          f" for k in {REPORTED!r} if k in os.environ}}}}))")
  return script(path, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
                ' "$@"\n')


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
  """The environment of the real runs: one compilation cache, LLVM optimisations off (as in
  tests/test_train_loop.py: the same IEEE semantics for every run, and fast compiles)."""
  cache = tmp_path_factory.mktemp("jax_cache")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "DEVICES_"))}
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             XLA_FLAGS="--xla_backend_optimization_level=0",
             PYTHON=sys.executable,
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return env


def local(n, workdir, *flags, env, timeout=300):
  return subprocess.run(["bash", str(LAUNCH / "local.sh"), str(n), CONFIG, str(workdir), *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def exact(workdir) -> list[dict]:
  return [{k: v for k, v in m.items() if not k.startswith("perf/")}
          for m in read_metrics(str(workdir))]


# ---------------------------------------------------------------------------------------------
# local.sh

def test_local_two_processes_give_the_metrics_of_one(run_env, tmp_path):
  one, two = tmp_path / "one", tmp_path / "two"
  flags = [*STEPS, "--config.data.eval_examples=0"]  # no eval: one program less to compile
  # The 1-process reference runs alongside (plain python -m jkd.train, not the launcher).
  with open(tmp_path / "one.log", "w") as log:
    ref = subprocess.Popen([sys.executable, "-m", "jkd.train", "--config", CONFIG, "--workdir",
                            str(one), *flags], cwd=ROOT, env=run_env, stdout=log, stderr=log)
    try:
      proc = local(2, two, *flags, env=run_env)
    finally:
      ref_code = ref.wait(timeout=300)
  assert ref_code == 0, (tmp_path / "one.log").read_text()[-3000:]
  assert proc.returncode == 0, proc.stderr[-3000:]
  for i in range(2):  # Every process ran to the end and logged to its own file.
    assert (two / "logs" / f"proc{i}.log").read_text().strip().endswith("done at step 4")
  assert "2 process(es), 127.0.0.1:" in proc.stderr
  want, got = exact(one), exact(two)
  assert [m["step"] for m in want] == [1, 2, 3, 4]
  assert [sorted(m) for m in got] == [sorted(m) for m in want]
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=5e-5, atol=1e-6, err_msg=f"{k} step {w['step']}")
  assert want[3]["loss/total"] != want[0]["loss/total"]  # it trained


def test_local_failing_rank_is_named_and_the_others_killed(run_env, tmp_path):
  # Rank 1 dies at once; rank 0 (the coordinator) would wait minutes for it.
  pids = tmp_path / "pids"
  pids.mkdir()
  fake = script(tmp_path / "python", f"""#!/bin/bash
echo $$ > {pids}/$JAX_PROCESS_ID
if [ "$JAX_PROCESS_ID" = 1 ]; then echo "rank one is broken" >&2; exit 7; fi
exec {shlex.quote(sys.executable)} "$@"
""")
  proc = local(2, tmp_path / "run", *STEPS, env=dict(run_env, PYTHON=str(fake)), timeout=120)
  assert proc.returncode == 7, proc.stderr
  assert "rank 1 failed (exit status 7)" in proc.stderr
  assert "rank one is broken" in proc.stderr  # the tail of its log
  assert (tmp_path / "run" / "logs" / "proc0.log").exists()
  rank0 = int((pids / "0").read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(rank0, 0)


def test_local_bad_config_key_fails_naming_a_rank(run_env, tmp_path):
  proc = local(2, tmp_path / "run", "--config.train.stepz=4", env=run_env, timeout=120)
  assert proc.returncode != 0
  assert "local.sh: rank " in proc.stderr and " failed (exit status " in proc.stderr
  assert 'Did you mean "steps"' in proc.stderr  # the tail of the failed rank's log


def test_local_environment_of_each_process(run_env, tmp_path):
  fake = report_python(tmp_path / "python")
  env = dict(run_env, PYTHON=str(fake), DEVICES_PER_PROC="4", XLA_FLAGS="--xla_dump_to=/x")
  env.pop("JAX_PLATFORMS")
  proc = local(3, tmp_path / "run", "--config.train.steps=2", env=env)
  assert proc.returncode == 0, proc.stderr
  got = [json.loads((tmp_path / "run" / "logs" / f"proc{i}.log").read_text()) for i in range(3)]
  coordinator = got[0]["env"]["JAX_COORDINATOR_ADDRESS"]
  assert coordinator.startswith("127.0.0.1:") and int(coordinator.split(":")[1]) > 0
  for i, g in enumerate(got):
    assert g["argv"] == ["-m", "jkd.train", "--config", CONFIG, "--workdir",
                         str(tmp_path / "run"), "--config.train.steps=2"]
    assert g["env"] == {
        "JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "3",
        "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=4"}
  # One process: no coordinator; JAX_PLATFORMS as given.
  proc = local(1, tmp_path / "single", env=dict(env, JAX_PLATFORMS="cuda", DEVICES_PER_PROC=""))
  assert proc.returncode == 0, proc.stderr
  g = json.loads((tmp_path / "single" / "logs" / "proc0.log").read_text())
  assert g["env"] == {"JAX_PROCESS_ID": "0", "JAX_PLATFORMS": "cuda",
                      "XLA_FLAGS": "--xla_dump_to=/x"}


def test_local_sigterm_is_passed_to_every_process(tmp_path):
  fake = script(tmp_path / "python", """#!/bin/bash
trap 'echo "rank $JAX_PROCESS_ID: SIGTERM"; exit 0' TERM
echo started
while :; do sleep 0.05; done
""")
  logs = tmp_path / "run" / "logs"
  proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "2", CONFIG, str(tmp_path / "run")],
                          cwd=ROOT, env=dict(os.environ, PYTHON=str(fake)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 60
    while not all((logs / f"proc{i}.log").exists() and "started" in
                  (logs / f"proc{i}.log").read_text() for i in range(2)):
      assert time.monotonic() < deadline and proc.poll() is None, "the processes did not start"
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  assert "SIGTERM to every process" in err
  for i in range(2):
    assert (logs / f"proc{i}.log").read_text().splitlines()[-1] == f"rank {i}: SIGTERM"


@pytest.mark.parametrize("args, message", [
    ([], "expected N CONFIG WORKDIR, got 0 argument(s)"),
    (["two", CONFIG, "/tmp/x"], "N must be a positive integer (got 'two')"),
    (["0", CONFIG, "/tmp/x"], "N must be a positive integer (got '0')"),
    (["2", "configs/nope.py:arg", "/tmp/x"], "config file 'configs/nope.py' not found"),
])
def test_local_usage(args, message):
  proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2
  assert message in proc.stderr and "usage: launch/local.sh N CONFIG WORKDIR" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Syntax of every script.

@pytest.mark.parametrize("name", ["local.sh", "tpu_vm.sh", "slurm_gpu.sbatch"])
def test_scripts_parse(name):
  proc = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert os.access(LAUNCH / name, os.X_OK)


# ---------------------------------------------------------------------------------------------
# tpu_vm.sh

@pytest.fixture
def gcloud_stub(tmp_path):
  """A gcloud on PATH that appends its arguments (one JSON list a line) to calls.jsonl and
  answers `describe` with $TPU_STATE (exit 1 when empty: no such TPU); keeps a copy of the
  archive given to `scp` as calls.jsonl.tar.gz."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  calls = tmp_path / "calls.jsonl"
  code = ("import json, os, sys; a = sys.argv[1:]; open(os.environ['CALLS'], 'a').write("
          "json.dumps(a) + '\\n'); s = os.environ.get('TPU_STATE', '');"
          " print(s) if 'describe' in a else None; import shutil;"
          " shutil.copy(a[4], os.environ['CALLS'] + '.tar.gz') if 'scp' in a else None;"
          " sys.exit(1 if 'describe' in a and not s else 0)")
  script(bindir / "gcloud", f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
         f'{shlex.quote(code)} "$@"\n')
  # The plan's Python: records its arguments as ["plan", ...] and exits with $PLAN_EXIT.
  plan = ("import json, os, sys; open(os.environ['CALLS'], 'a').write(json.dumps(['plan'] +"
          " sys.argv[1:]) + '\\n'); sys.exit(int(os.environ.get('PLAN_EXIT', '0')))")
  script(bindir / "plan_python", f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
         f'{shlex.quote(plan)} "$@"\n')
  env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls),
             JKD_PLAN_PYTHON=str(bindir / "plan_python"))
  for k in ("TPU_NAME", "TPU_ZONE", "TPU_ACCELERATOR", "TPU_RUNTIME_VERSION", "TPU_PROJECT",
            "TPU_SPOT", "JKD_REPO", "JKD_REF", "JKD_REMOTE_DIR", "JKD_DISTRIBUTED_MODE"):
    env.pop(k, None)
  read = lambda: ([json.loads(line) for line in calls.read_text().splitlines()]  # noqa: E731
                  if calls.exists() else [])
  return env, read


def tpu_vm(*args, env):
  return subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)


def command_of(argv: list[str]) -> str:
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def test_tpu_vm_dry_run_prints_the_gcloud_commands(gcloud_stub):
  env, calls = gcloud_stub
  proc = tpu_vm("--dry-run", "--name", "pod", "--zone", "europe-west4-a", "--accelerator",
                "v4-32", "--spot", "--project", "proj", CONFIG, "/mnt/shared/run 1",
                "--config.train.steps=10", env=env)
  assert proc.returncode == 0, proc.stderr
  assert calls() == []  # nothing ran
  lines = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
  where = ["--zone=europe-west4-a", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  plan = lines.pop(0)  # The plan first, for the accelerator's topology, with the overrides.
  assert plan[1:] == ["-m", "jkd.plan", "--config", CONFIG, "--topology", "v4-32",
                      "--config.train.steps=10"]
  assert lines[0] == [*tpu, "describe", "pod", *where, "--format=value(state)"]
  assert lines[1] == [*tpu, "create", "pod", *where, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
  assert lines[2][:5] == [*tpu, "scp"] and lines[2][6:] == ["pod:jkd.tar.gz", *where,
                                                            "--worker=all"]
  ssh = [*tpu, "ssh", "pod", *where, "--worker=all"]
  assert [line[:-1] for line in lines[3:]] == [ssh, ssh]
  setup, run = command_of(lines[3]), command_of(lines[4])
  assert "tar -xzf jkd.tar.gz -C jkd" in setup
  assert "uv pip install --quiet --python $HOME/jkd-venv/bin/python -e jkd 'jax[tpu]'" in setup
  assert run.endswith("$HOME/jkd-venv/bin/python -m jkd.train --config configs/kd_tiny.py"
                      " --workdir '/mnt/shared/run 1' --config.train.progress_bar=False"
                      " --config.train.steps=10")
  assert "JAX_COORDINATOR_ADDRESS" in run and "JKD_DISTRIBUTED" not in run

  proc = tpu_vm("--dry-run", "--repo", "https://example.com/jkd.git", "--ref", "v1",
                "--distributed", "auto", "--detach", CONFIG, "/w", env=env)
  assert proc.returncode == 0, proc.stderr
  lines = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
  assert lines.pop(0)[-2:] == ["--topology", "v4-8"]
  assert lines[1][4:] == ["create", "jkd-tpu", "--zone=us-central2-b", "--accelerator-type=v4-8",
                          "--version=tpu-ubuntu2204-base"]
  assert [line[4] for line in lines] == ["describe", "create", "ssh", "ssh"]  # no scp
  setup, run = command_of(lines[2]), command_of(lines[3])
  assert "git clone --quiet https://example.com/jkd.git jkd" in setup
  assert "git -C jkd checkout --quiet v1" in setup
  assert "export JKD_DISTRIBUTED=auto;" in run and "JAX_COORDINATOR_ADDRESS" not in run
  assert run.startswith("set -eo pipefail; cd jkd;")
  assert "nohup $HOME/jkd-venv/bin/python -m jkd.train" in run
  assert run.endswith("> $HOME/jkd.log 2>&1 < /dev/null &")


def test_tpu_vm_runs_gcloud(gcloud_stub, tmp_path):
  env, calls = gcloud_stub
  proc = tpu_vm("--skip-setup", CONFIG, "/w", env=dict(env, TPU_STATE="READY"))
  assert proc.returncode == 0, proc.stderr
  assert calls()[0][:3] == ["plan", "-m", "jkd.plan"]  # Planned first.
  assert [c[3] for c in calls()[1:]] == ["describe", "ssh"]  # reused
  (tmp_path / "calls.jsonl").unlink()
  proc = tpu_vm(CONFIG, "/w", env=env)  # no TPU yet: created, then the code copied
  assert proc.returncode == 0, proc.stderr
  got = calls()[1:]
  assert [c[3] for c in got] == ["describe", "create", "scp", "ssh", "ssh"]
  assert not pathlib.Path(got[2][4]).exists()  # the archive is removed afterwards
  with tarfile.open(tmp_path / "calls.jsonl.tar.gz") as tar:  # what the workers got
    names = set(tar.getnames())
  assert {"pyproject.toml", "jkd/train/loop.py", "launch/local.sh", CONFIG} <= names
  assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)
  (tmp_path / "calls.jsonl").unlink()
  proc = tpu_vm(CONFIG, "/w", env=dict(env, TPU_STATE="PREEMPTED"))
  assert proc.returncode == 1
  assert "jkd-tpu is PREEMPTED; delete it" in proc.stderr
  assert "gcloud compute tpus tpu-vm delete jkd-tpu --zone=us-central2-b" in proc.stderr
  assert [c[3] for c in calls()[1:]] == ["describe"]


def test_tpu_vm_refuses_a_run_the_plan_says_does_not_fit(gcloud_stub, tmp_path):
  env, calls = gcloud_stub
  proc = tpu_vm("--accelerator", "v5litepod-16", CONFIG, "/w", "--config.data.batch_size=64",
                env=dict(env, PLAN_EXIT="7"))
  assert proc.returncode == 7
  assert "does not fit a v5litepod-16" in proc.stderr and "--no-plan" in proc.stderr
  (plan,) = calls()  # Nothing else ran: no TPU was created.
  assert plan[-3:] == ["--topology", "v5e-16", "--config.data.batch_size=64"]
  (tmp_path / "calls.jsonl").unlink()
  proc = tpu_vm("--no-plan", "--skip-setup", CONFIG, "/w",
                env=dict(env, PLAN_EXIT="7", TPU_STATE="READY"))
  assert proc.returncode == 0, proc.stderr
  assert [c[0] for c in calls()] == ["compute", "compute"]  # Overridden: gcloud only.
  (tmp_path / "calls.jsonl").unlink()
  proc = tpu_vm(CONFIG, "/w", env=dict(env, PLAN_EXIT="2"))
  assert proc.returncode == 2 and "the plan failed (exit 2" in proc.stderr
  proc = tpu_vm("--accelerator", "v3-8", CONFIG, "/w", env=env)
  assert proc.returncode == 2 and "cannot plan for --accelerator v3-8" in proc.stderr


def test_tpu_vm_worker_command_sets_the_distributed_environment(gcloud_stub, tmp_path):
  """The run command of each worker, executed with a stub metadata server (curl) and python."""
  env, _ = gcloud_stub
  proc = tpu_vm("--dry-run", CONFIG, "/w", "--config.train.steps=3", env=env)
  assert proc.returncode == 0, proc.stderr
  run = command_of(shlex.split(proc.stdout.splitlines()[-1]))
  home = tmp_path / "home"
  (home / "jkd").mkdir(parents=True)
  (home / "jkd-venv" / "bin").mkdir(parents=True)
  report_python(home / "jkd-venv" / "bin" / "python")
  bindir = tmp_path / "bin"
  script(bindir / "curl", """#!/bin/bash
case "${@: -1}" in
  */agent-worker-number) echo -n "$WORKER" ;;
  */worker-network-endpoints) echo -n "$ENDPOINTS" ;;
  *) exit 22 ;;
esac
""")
  for endpoints, coordinator in [
      ("t-w-0:x:10.1.0.7,t-w-1:x:10.1.0.8,t-w-2:x:10.1.0.9,t-w-3:x:10.1.0.2", "10.1.0.7"),
      ("host-a,host-b,host-c,host-d", "host-a")]:
    for worker in range(4):
      out = subprocess.run(["bash", "-c", run], cwd=home, capture_output=True, text=True,
                           env=dict(env, HOME=str(home), WORKER=str(worker),
                                    ENDPOINTS=endpoints), timeout=30)
      assert out.returncode == 0, out.stderr
      got = json.loads(out.stdout)
      assert got["argv"] == ["-m", "jkd.train", "--config", CONFIG, "--workdir", "/w",
                             "--config.train.progress_bar=False", "--config.train.steps=3"]
      assert {k: got["env"].get(k) for k in REPORTED[:3]} == {
          "JAX_COORDINATOR_ADDRESS": f"{coordinator}:8476", "JAX_NUM_PROCESSES": "4",
          "JAX_PROCESS_ID": str(worker)}


@pytest.mark.parametrize("args, message", [
    ([CONFIG], "expected CONFIG WORKDIR after the options"),
    (["--zone"], "--zone needs a value"),
    (["--bogus", CONFIG, "/w"], "unknown option --bogus"),
    (["--distributed", "mpi", CONFIG, "/w"], "--distributed must be env or auto (got 'mpi')"),
    (["--ref", "v1", CONFIG, "/w"], "--ref needs --repo"),
    (["configs/nope.py", "/w"], "config 'configs/nope.py' is not a file of"),
])
def test_tpu_vm_usage(gcloud_stub, args, message):
  env, calls = gcloud_stub
  proc = tpu_vm(*args, env=env)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert calls() == []


# ---------------------------------------------------------------------------------------------
# slurm_gpu.sbatch

@pytest.fixture
def slurm(tmp_path):
  """srun and scontrol stubs, and the environment of a 2-node job with 2 tasks per node."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  script(bindir / "scontrol", """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] || exit 9
printf 'gpu07\\ngpu08\\n'
""")
  # srun: records its options, then runs the task command once per rank (as SLURM would on
  # the nodes), with SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID.
  script(bindir / "srun", """#!/bin/bash
while [[ $1 == --* ]]; do echo "$1" >> "$SRUN_OPTIONS"; shift; done
per_node=${SLURM_NTASKS_PER_NODE%%(*}
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" || exit
done
""")
  # python: the job's GPU check (`python -c ...`) gets $JAX_BACKEND_STUB, the tasks report.
  report_python(bindir / "python-report")
  script(bindir / "python", '#!/bin/sh\n[ "$1" = -c ] && { echo "$JAX_BACKEND_STUB"; exit 0; }\n'
         'exec "$(dirname "$0")/python-report" "$@"\n')
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "JAX_", "CUDA_")) and k not in ("CONFIG", "WORKDIR")}
  env.update(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="1234",
             JAX_BACKEND_STUB="gpu",
             SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2(x2)",
             SLURM_SUBMIT_DIR=str(ROOT), SRUN_OPTIONS=str(tmp_path / "srun_options"))
  env.pop("PYTHON", None)
  return env


def sbatch(*args, env, cwd):
  return subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=60)


def ranks(workdir, n=4):
  return [json.loads((workdir / "logs" / f"proc{i}.log").read_text()) for i in range(n)]


def test_slurm_environment_of_each_rank(slurm, tmp_path):
  workdir = tmp_path / "run"
  proc = sbatch(CONFIG, str(workdir), "--config.train.steps=3", env=slurm, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "--kill-on-bad-exit=1" in (tmp_path / "srun_options").read_text().split()
  for i, got in enumerate(ranks(workdir)):
    assert got["argv"] == ["-m", "jkd.train", "--config", CONFIG, "--workdir", str(workdir),
                           "--config.train.progress_bar=False", "--config.train.steps=3"]
    assert got["env"] == {"JAX_COORDINATOR_ADDRESS": "gpu07:21234", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": str(i), "CUDA_VISIBLE_DEVICES": str(i % 2)}
  header = [line for line in (LAUNCH / "slurm_gpu.sbatch").read_text().splitlines()
            if line.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header


def test_slurm_gpus_per_task_and_config_from_env(slurm, tmp_path):
  # --gpus-per-task: SLURM binds each task's GPU, the script leaves CUDA_VISIBLE_DEVICES alone.
  # CONFIG and WORKDIR from the environment; JKD_PORT sets the port.
  workdir = tmp_path / "run"
  env = dict(slurm, SLURM_GPUS_PER_TASK="1", CONFIG=CONFIG, WORKDIR=str(workdir),
             JKD_PORT="4567")
  proc = sbatch(env=env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  for i, got in enumerate(ranks(workdir)):
    assert got["argv"][-1] == "--config.train.progress_bar=False"
    assert got["env"] == {"JAX_COORDINATOR_ADDRESS": "gpu07:4567", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": str(i)}


def test_slurm_usage(slurm, tmp_path):
  proc = sbatch(env=slurm, cwd=tmp_path)
  assert proc.returncode == 2 and "CONFIG and WORKDIR are required" in proc.stderr
  env = {k: v for k, v in slurm.items() if k != "SLURM_JOB_NODELIST"}
  proc = sbatch(CONFIG, str(tmp_path / "w"), env=env, cwd=tmp_path)
  assert proc.returncode == 2 and "SLURM_JOB_NODELIST is not set" in proc.stderr
  proc = sbatch("configs/nope.py", str(tmp_path / "w"), env=slurm, cwd=tmp_path)
  assert proc.returncode == 2 and "config 'configs/nope.py' not found in" in proc.stderr


def test_slurm_stops_when_jax_sees_no_gpu(slurm, tmp_path):
  # jkd installed without its cuda extra: JAX computes on the CPU. The job stops before srun,
  # naming the install; JKD_GPU_CHECK=0 starts the tasks all the same.
  workdir = tmp_path / "run"
  proc = sbatch(CONFIG, str(workdir), env=dict(slurm, JAX_BACKEND_STUB="cpu"), cwd=tmp_path)
  assert proc.returncode == 3
  assert "JAX computes on 'cpu', not on a GPU" in proc.stderr
  assert "pip install -e '.[cuda]'" in proc.stderr
  assert not (tmp_path / "srun_options").exists()
  proc = sbatch(CONFIG, str(workdir), env=dict(slurm, JAX_BACKEND_STUB="cpu", JKD_GPU_CHECK="0"),
                cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert len(ranks(workdir)) == 4
