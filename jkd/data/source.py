"""The batch-source interface of the training engine: iteration, a resumable position, hooks.

Every source of batches that :func:`jkd.train.train` consumes is a :class:`BatchSource`: it
yields per-process ``{name: [rows, ...]}`` numpy batches, its position is JSON state saved with
each checkpoint, and the engine calls its hooks at fixed points of the loop. The hooks do
nothing by default; a source overrides the ones it needs:

=====================  ========================================================================
``bind_models``        once, when the teacher is built: the teacher's parameters and config
                       and the student's config (sources that score or rank with the teacher:
                       Distillation-DPO rounds, MiniPLM, DDK)
``before_batch``       the current student parameters before each ``next()`` (sources that
                       sample from the student: on-policy KD, Distillation-DPO rounds)
``after_eval``         each evaluation's metrics and the student parameters (DistiLLM's
                       adaptive schedule, DDK's domain weights)
``get_state``          the position, JSON-serialisable, saved with each checkpoint
``set_state``          moves to a position from ``get_state`` (a resumed run)
``one_epoch``          an ordered pass for evaluation that leaves the position alone
=====================  ========================================================================

:func:`as_batch_source` adapts any iterator with ``get_state``/``set_state`` (a user's own)
to the interface.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

PyTree = Any
Batch = dict[str, Any]


class BatchSource:
  """Base class of batch sources (see the module docstring for the hooks)."""

  def __iter__(self) -> "BatchSource":
    return self

  def __next__(self) -> Batch:
    raise NotImplementedError

  def get_state(self) -> Any:
    """The position, JSON-serialisable (saved with each checkpoint)."""
    raise NotImplementedError

  def set_state(self, state: Any) -> None:
    """Moves to a position from :meth:`get_state`."""
    raise NotImplementedError

  def one_epoch(self) -> Iterator[Batch]:
    """One ordered pass (evaluation), leaving the position alone."""
    raise NotImplementedError(f"{type(self).__name__} serves no evaluation pass (one_epoch).")

  def bind_models(self, *, teacher_params: PyTree, teacher_config: Any,
                  student_config: Any) -> None:
    """Receives the teacher (and the student's config) once the engine has built it."""

  def before_batch(self, params: PyTree) -> None:
    """Receives the current student parameters before each ``next()``."""

  def after_eval(self, metrics: Mapping[str, float], params: PyTree) -> None:
    """Receives each evaluation's metrics and the student parameters it evaluated."""


class _Adapted(BatchSource):
  """Any iterator with ``get_state``/``set_state`` (and maybe ``one_epoch``) as a source."""

  def __init__(self, inner):
    self.inner = inner

  def __next__(self) -> Batch:
    return next(self.inner)

  def get_state(self) -> Any:
    return self.inner.get_state()

  def set_state(self, state: Any) -> None:
    self.inner.set_state(state)

  def one_epoch(self) -> Iterator[Batch]:
    return self.inner.one_epoch()


def as_batch_source(source) -> BatchSource | None:
  """``source`` as a :class:`BatchSource` (None stays None).

  Raises:
    TypeError: ``source`` is not an iterator with ``get_state`` and ``set_state``.
  """
  if source is None or isinstance(source, BatchSource):
    return source
  missing = [m for m in ("__next__", "get_state", "set_state") if not callable(
      getattr(source, m, None))]
  if missing:
    raise TypeError(f"a batch source needs {missing} ({type(source).__name__} lacks them):"
                    " subclass jkd.data.BatchSource, or use jkd.data.ArraySource for arrays.")
  return _Adapted(source)
