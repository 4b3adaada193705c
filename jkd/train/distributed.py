"""Multi-process runs on JAX's own runtime: start-up from the environment, failed peers, and
preemption.

Multi-process runs call ``jax.distributed.initialize`` from ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (:func:`initialize_distributed`); SIGTERM stops
every process at the same step (:class:`Preemption`).

**A failed peer.** When a process dies (a crash, SIGKILL, a lost host) or hangs (SIGSTOP, a
frozen host), every other process exits with code 6 (:data:`EXIT_PEER`,
``jkd.errors.EXIT_PEER``) about ``distributed.heartbeat_timeout_s`` after the peer went silent
(within a second more), after printing this one line::

  error: process 1 of 2 stopped responding (no heartbeat for 3 s;
  distributed.heartbeat_timeout_s); this process stops too. The last checkpoint is intact:
  restart all processes to resume.

Orbax renames a checkpoint into place only once it is complete, so the newest complete one stays
resumable. A collective whose peer died raises at once in the survivor (gloo: ``Connection
closed by peer``): :func:`exit_if_peer_failed`, called before such an error is reported, waits
for the verdict, so the line above replaces that error (``python -m jkd.train`` calls it).

**Why a watchdog of jkd's own.** JAX's heartbeat ends such a run with ``SIGABRT`` (exit status
134): a fatal C++ log line (``Terminating process because the JAX distributed service detected
fatal errors``), its stack, then the ``faulthandler`` dump of every Python thread (absl's
``app.run`` enables ``faulthandler``). Its client's ``missed_heartbeat_callback`` cannot replace
that from Python in jax 0.10.2: ``jax.distributed.initialize`` does not pass one, and one passed
to ``get_distributed_runtime_client`` is called with an ``absl::Status``, which has no Python
type; the failed conversion (``std::bad_cast``) aborts the process the same way. So
:func:`initialize_distributed` starts two daemon threads: ``jkd-heartbeat`` writes this
process's counter under ``jkd/heartbeat/`` in the coordination service's key-value store and
reads the others' every ``min(1, heartbeat_timeout_s / 6)`` seconds; ``jkd-watchdog`` exits on
a counter unchanged for ``heartbeat_timeout_s``, or on no answer from the coordinator for as long
(then process 0 is named). JAX's own heartbeat gets the longer timeout of
:func:`jax_heartbeat_timeout` and stays as the backstop.

**Limits.** The threads need Python's GIL: ``heartbeat_timeout_s`` must exceed the longest time
a process holds it without a break (only C code that does not release it does); past that,
JAX's backstop aborts as before. The coordinator (process 0) dying at once, rather than hanging,
is seen first by JAX itself (its error-polling connection to the coordinator breaks): the others
then abort at once with JAX's message and exit status 134.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
from jax.experimental import multihost_utils

from jkd import errors
from jkd.train import stopping

_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

#: Exit status of a process that stops because another process of the run failed.
EXIT_PEER = errors.EXIT_PEER

_HEARTBEAT_DIR = "jkd/heartbeat/"
_watchdog: _Watchdog | None = None


def jax_heartbeat_timeout(heartbeat_timeout_s: float) -> int:
  """The heartbeat timeout given to JAX: a backstop behind the watchdog's.

  JAX's service finds a silent process between half and all of its timeout after the silence
  starts (its processes beat every half timeout), and a process finds a silent coordinator
  after half its timeout plus a second. With ``2 t + 6`` both come ``t + 3`` s or later, while
  the watchdog has decided by ``t + 1.5`` s (its interval is at most 1 s).
  """
  return int(2 * heartbeat_timeout_s + 6)


def initialize_distributed(cfg) -> bool:
  """``jax.distributed.initialize`` from the ``JAX_*`` environment variables, when set.

  With ``JKD_DISTRIBUTED=auto`` and no ``JAX_COORDINATOR_ADDRESS``, JAX detects the cluster
  itself (Cloud TPU VMs, SLURM, Open MPI). A peer silent for ``distributed.heartbeat_timeout_s``
  makes the others print one ``error:`` line and exit with :data:`EXIT_PEER` instead of hanging
  (see the module docstring). Call it before any other JAX work; later calls do nothing.

  Returns:
    True when running multi-process.
  """
  env = {k: os.environ.get(k, "") for k in _DIST_ENV}
  mode = os.environ.get("JKD_DISTRIBUTED", "")
  if mode not in ("", "auto"):
    raise ValueError(f"JKD_DISTRIBUTED={mode!r}: use 'auto' (jax.distributed.initialize detects"
                     " a Cloud TPU, SLURM or MPI cluster) or leave it unset.")
  if not env["JAX_COORDINATOR_ADDRESS"] and mode != "auto":
    return False
  kwargs = {}
  if env["JAX_COORDINATOR_ADDRESS"]:
    missing = [k for k, v in env.items() if not v]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not; set all of"
                       f" {list(_DIST_ENV)} for a multi-process run.")
    kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  if not jax.distributed.is_initialized():
    d = cfg.distributed
    timeout_s = float(d.heartbeat_timeout_s)
    jax.distributed.initialize(
        **kwargs, initialization_timeout=int(d.initialization_timeout_s),
        heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout_s),
        shutdown_timeout_seconds=int(d.shutdown_timeout_s))
    if jax.process_count() > 1:
      _start_watchdog(timeout_s)
  return jax.process_count() > 1


def exit_if_peer_failed() -> None:
  """For an error that ends a multi-process run: exits as for a failed peer if that explains it.

  A collective whose peer died raises at once (gloo's ``ValueError: UNKNOWN: Gloo AllGather
  failed: ... Connection closed by peer``), long before the peer's silence lasts the heartbeat
  timeout. Call this before reporting such an error: it returns as soon as every other process
  has shown two new heartbeats (about three heartbeat intervals, at most 3 s: the error is this
  process's own), and otherwise waits while the watchdog finds the silent one, prints its line
  and exits with :data:`EXIT_PEER`. Returns at once in a single-process run.
  """
  watchdog = _watchdog
  if watchdog is not None and watchdog.running():
    watchdog.wait_for_verdict()


def _start_watchdog(timeout_s: float) -> None:
  global _watchdog
  if _watchdog is not None:
    return
  # The coordination service's client: private in jax 0.10.2 (orbax reads it the same way).
  jax_distributed = getattr(jax._src, "distributed", None)  # pylint: disable=protected-access
  state = getattr(jax_distributed, "global_state", None)
  client = getattr(state, "client", None)
  if client is None:
    return
  _watchdog = _Watchdog(client, jax.process_index(), jax.process_count(), timeout_s)


def _names(ids: list[int]) -> str:
  if len(ids) == 1:
    return f"process {ids[0]}"
  return "processes " + ", ".join(str(i) for i in ids[:-1]) + f" and {ids[-1]}"


class _Watchdog:
  """Heartbeats through the coordination service's key-value store; exits on a silent peer.

  ``jkd-heartbeat`` sets ``jkd/heartbeat/<process>`` to a counter and reads the directory
  every ``interval`` seconds; ``jkd-watchdog`` exits the process with :data:`EXIT_PEER` when a
  peer's counter has not changed for ``timeout_s`` (or this process has not reached the
  coordinator for that long: then process 0 is the silent one). Both keep going while the
  process waits at JAX's shutdown barrier (at exit) and stop once ``jax.distributed.shutdown``
  has passed it.
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
    self._client = client
    self._me = process_id
    self._count = num_processes
    self._timeout = timeout_s
    self._interval = min(1.0, timeout_s / 6)
    now = time.monotonic()
    # Per peer: its last counter, when that was first seen, and how many changes were seen.
    self._seen = {p: (None, now, 0) for p in range(num_processes) if p != process_id}
    self._reached = now  # Last time a whole round with the coordinator succeeded.
    for target, name in ((self._beat, "jkd-heartbeat"), (self._watch, "jkd-watchdog")):
      threading.Thread(target=target, name=name, daemon=True).start()

  def running(self) -> bool:
    return jax.distributed.is_initialized()

  def wait_for_verdict(self) -> None:
    """Returns once every peer has beaten twice since the call (one new counter may have been
    written before a peer died), or after the timeout, by when a silent peer has made the
    watchdog exit the process."""
    before = {p: changes for p, (_, _, changes) in self._seen.items()}
    deadline = time.monotonic() + self._timeout + 2 * self._interval + 1
    while time.monotonic() < deadline and self.running():
      if all(self._seen[p][2] >= n + 2 for p, n in before.items()):
        return
      time.sleep(self._interval / 4)

  def _beat(self) -> None:
    beat = 0
    while self.running():
      beat += 1
      try:
        self._client.key_value_set(f"{_HEARTBEAT_DIR}{self._me}", str(beat),
                                   allow_overwrite=True)
        entries = self._client.key_value_dir_get(_HEARTBEAT_DIR)
      except Exception:  # noqa: BLE001 (the service is gone or in error: the peers go stale)
        entries = None
      now = time.monotonic()
      if entries is not None:
        self._reached = now
        for key, value in entries:
          process = int(key.rsplit("/", 1)[-1])
          if process in self._seen and self._seen[process][0] != value:
            self._seen[process] = (value, now, self._seen[process][2] + 1)
      time.sleep(self._interval)

  def _watch(self) -> None:
    while True:
      time.sleep(self._interval / 2)
      if not self.running():  # jax.distributed.shutdown has passed its barrier.
        return
      now = time.monotonic()
      if self._me != 0 and now - self._reached > self._timeout:
        self._fail(f"process 0 of {self._count} (the coordinator)")
      silent = sorted(p for p, (_, t, _) in self._seen.items() if now - t > self._timeout)
      if silent:
        self._fail(f"{_names(silent)} of {self._count}")

  def _fail(self, who: str) -> None:
    line = (f"error: {who} stopped responding (no heartbeat for {self._timeout:g} s;"
            " distributed.heartbeat_timeout_s); this process stops too. The last checkpoint is"
            " intact: restart all processes to resume.\n")
    try:
      os.write(2, line.encode())
      sys.stdout.flush()
    finally:
      os._exit(EXIT_PEER)  # pylint: disable=protected-access


class Preemption:
  """SIGTERM -> stop at the next step boundary (all processes at the same step).

  One process: the flag of :func:`jkd.train.stopping.sigterm_noted`, inside which
  :func:`jkd.train.train` runs (one SIGTERM handler for the data preparation and the loop).
  Several: JAX's preemption sync point (the distributed runtime catches the signal and agrees
  on a step).
  """

  def __init__(self):
    self._multi = jax.process_count() > 1

  def __call__(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return stopping.requested()
