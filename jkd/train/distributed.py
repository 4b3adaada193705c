"""Multi-process runs on JAX's own runtime: start-up from the environment, and preemption.

Multi-process runs call ``jax.distributed.initialize`` from ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (:func:`initialize_distributed`); SIGTERM stops
every process at the same step (:class:`Preemption`).
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(cfg) -> bool:
  """``jax.distributed.initialize`` from the ``JAX_*`` environment variables, when set.

  With ``JKD_DISTRIBUTED=auto`` and no ``JAX_COORDINATOR_ADDRESS``, JAX detects the cluster
  itself (Cloud TPU VMs, SLURM, Open MPI). The heartbeat timeout
  (``distributed.heartbeat_timeout_s``) bounds how long the others wait for a dead peer: they
  then exit with an error instead of hanging. Call it before any other JAX work.

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
    jax.distributed.initialize(
        **kwargs, initialization_timeout=int(d.initialization_timeout_s),
        heartbeat_timeout_seconds=int(d.heartbeat_timeout_s),
        shutdown_timeout_seconds=int(d.shutdown_timeout_s))
  return jax.process_count() > 1


class Preemption:
  """SIGTERM -> stop at the next step boundary (all processes at the same step).

  One process: a signal handler sets a flag. Several: JAX's preemption sync point (the
  distributed runtime catches the signal and agrees on a step).
  """

  def __init__(self):
    self._flag = False
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def __call__(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
