"""Students made from a teacher: a smaller config, or the teacher with every k-th layer kept."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jkd.models.config import ModelConfig

PyTree = Any


def layers_every(num_layers: int, every: int) -> list[int]:
  """The layers kept when taking every ``every``-th: ``every-1, 2*every-1, ...``.

  Counting from the top keeps the teacher's last layer (the one its output head was trained
  with) whenever ``num_layers`` is a multiple of ``every``.

  >>> layers_every(30, 5)
  [4, 9, 14, 19, 24, 29]
  """
  if not isinstance(every, int) or not 1 <= every <= num_layers:
    raise ValueError(f"every must be an int in [1, {num_layers}] (got {every!r}).")
  return list(range(every - 1, num_layers, every))


def student_from_teacher(teacher_params: PyTree, teacher_config: ModelConfig, *,
                         every: int | None = None, layers: Sequence[int] | None = None
                         ) -> tuple[ModelConfig, PyTree]:
  """A student initialised from a subset of the teacher's layers (embeddings, norms, head kept).

  Args:
    teacher_params, teacher_config: the teacher.
    every: keep every ``every``-th layer (see :func:`layers_every`), or
    layers: the explicit layer indices to keep, in order.

  Returns:
    ``(student_config, student_params)``; the parameters are copies (the teacher's stay
    untouched and may be donated or freed independently).
  """
  n = teacher_config.num_layers
  if (every is None) == (layers is None):
    raise ValueError("pass exactly one of every= or layers=.")
  keep = layers_every(n, every) if every is not None else [int(i) for i in layers]
  if not keep or any(not 0 <= i < n for i in keep):
    raise ValueError(f"layers {keep} must be a non-empty list of indices in [0, {n}).")
  index = np.asarray(keep)
  params = dict(teacher_params)
  params["layers"] = jax.tree.map(lambda x: x[index], teacher_params["layers"])
  params = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, params)
  return teacher_config.replace(num_layers=len(keep)), params
