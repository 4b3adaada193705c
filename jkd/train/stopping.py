"""A SIGTERM before the training loop: noted, so that a run stopped while it prepares its data
(the teacher's corpus), builds its models or compiles exits cleanly, keeping what it did.

:func:`jkd.train.stages.run` and :func:`jkd.train.train` run inside :func:`sigterm_noted`; the
preparation steps poll :func:`requested` between units of work (the corpus between batches,
each written and fsynced) and the training loop checks it before every step, through
:class:`jkd.train.distributed.Preemption`. Single-process runs only: a multi-process run's
SIGTERM goes through JAX's preemption sync point.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import jax

_TERM = threading.Event()
_depth = 0


class Stopped(Exception):
  """A preparation step stopped at a SIGTERM; what it finished is kept for the next run."""


@contextlib.contextmanager
def sigterm_noted():
  """Within the block, SIGTERM sets a flag (:func:`requested`) instead of killing the process.

  Nested blocks share the flag; the outermost clears it on entry and restores the previous
  handler on exit. Outside the main thread, or with several processes, it does nothing.
  """
  global _depth
  if (threading.current_thread() is not threading.main_thread()
      or jax.process_count() > 1):
    yield
    return
  if _depth == 0:
    _TERM.clear()
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: _TERM.set())
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    signal.signal(signal.SIGTERM, previous)


def requested() -> bool:
  """Whether a SIGTERM arrived inside :func:`sigterm_noted`."""
  return _TERM.is_set()


def check() -> None:
  """Raises :class:`Stopped` when a SIGTERM arrived."""
  if _TERM.is_set():
    raise Stopped("SIGTERM")
