"""``python -m jkd.train`` as two JAX processes (one CPU device each, gloo collectives) started
from the JAX_* environment variables: SIGTERM to one process stops both at the same step with a
checkpoint; the pair resumes from it with the numbers of one process; a hung (SIGSTOP) or killed
(SIGKILL) peer then makes the other print one ``error:`` line first and exit with code 6 within
the heartbeat timeout."""

from __future__ import annotations

import re
import signal
import socket
import time

from jkd import errors

from test_train_loop import (checkpoint_steps, finish, last_step, reference,  # noqa: F401
                             shared, start, wait_for)
from test_train_sharded import assert_close_to


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


HEARTBEAT_S = 3
# The survivor's line (jkd.train.distributed), and what must not come before it.
PEER_LINE = re.compile(r"^error: process 1 of 2 stopped responding \(no heartbeat for 3 s;"
                       r" distributed\.heartbeat_timeout_s\); this process stops too\. The last"
                       r" checkpoint is intact: restart all processes to resume\.$", re.M)
DUMPS = ("Traceback", "Fatal Python error", "Thread 0x", "Check failure", "Terminating process")


def assert_peer_failure_reported(code, err, waited):
  """Exit code 6, the one line, nothing of a traceback or an abort before it, in time."""
  assert code == errors.EXIT_PEER, (code, err[-3000:])
  line = PEER_LINE.search(err)
  assert line, err[-3000:]
  before = err[:line.start()]
  assert not any(d in before for d in DUMPS), before[-3000:]
  assert "error: " not in before, before[-3000:]  # The first error line names the peer.
  assert waited < HEARTBEAT_S + 7, waited


def start_pair(shared, workdir):  # noqa: F811
  port = free_port()
  return [start(shared, workdir, f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}", env={
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"})
          for i in range(2)]


def test_preemption_resume_and_a_hung_peer(shared, reference, tmp_path):  # noqa: F811
  workdir = tmp_path / "run"

  # 1. The preemption notice (SIGTERM) reaches one host: both stop at one step and save it.
  procs = start_pair(shared, workdir)
  wait_for(procs[0], lambda: last_step(workdir) >= 3, "step 3")
  procs[1].send_signal(signal.SIGTERM)
  outs = []
  for proc in procs:
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    outs.append(out.strip().splitlines()[-1])
  assert outs[0] == outs[1] and outs[0].startswith("preempted at step"), outs
  stopped = int(outs[0].split()[-1])
  assert stopped in checkpoint_steps(workdir)

  # 2. The pair resumes (each process reads its shards of the checkpoint): data parallel over
  # processes gives the numbers of one process.
  procs = start_pair(shared, workdir)
  try:
    wait_for(procs[0], lambda: last_step(workdir) >= stopped + 3, f"step {stopped + 3}")
    # 3. A peer hangs (alive, silent: no TCP reset, only missed heartbeats).
    procs[1].send_signal(signal.SIGSTOP)
    hung_at = time.monotonic()
    code, _, err = finish(procs[0], timeout=60)
    waited = time.monotonic() - hung_at
  finally:
    procs[1].kill()
    procs[1].wait()
  assert_peer_failure_reported(code, err, waited)
  assert last_step(workdir) >= stopped + 3
  assert_close_to(workdir, reference, prefix=True)


def test_a_killed_peer(shared, tmp_path):  # noqa: F811
  """SIGKILL: the survivor's collective fails at once (the connection closes); the watchdog
  still names the peer, before any traceback, and the exit code is 6."""
  workdir = tmp_path / "run"
  procs = start_pair(shared, workdir)
  try:
    wait_for(procs[0], lambda: last_step(workdir) >= 2, "step 2")
    procs[1].kill()
    killed_at = time.monotonic()
    code, _, err = finish(procs[0], timeout=60)
    waited = time.monotonic() - killed_at
  finally:
    for proc in procs:
      proc.kill()
      proc.wait()
  assert_peer_failure_reported(code, err, waited)
