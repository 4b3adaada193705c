"""Data that the CPU variants of ``configs/`` read from disk, written on demand.

Config files import :mod:`jkd.train.recipes` only (no engine code); their ``make_cpu_data``
imports this module when a CPU variant's data is needed.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from jkd.data import teacher_cache
from jkd.data.arrays import synthetic_lm_examples
from jkd.train import build
from jkd.train import sharding


def write_cpu_teacher_cache(c, workdir: str, *, k: int = 16, num_examples: int = 16,
                            name: str = "teacher_cache") -> dict[str, Any]:
  """An offline top-``k`` cache of a CPU variant's random teacher over synthetic sequences.

  The teacher is the one training builds from ``c`` (same seed, same parameters), so the cache
  holds what ``teacher.online=True`` computes in the step. An existing cache is reused.

  Args:
    c: the CPU variant's config (``teacher.source="random"``).
    workdir: the TFDS root the cache is written under (``workdir/name/1.0.0``).
    k: top-k ids per position.
    num_examples: cached sequences of ``c.data.seq_len`` tokens.
    name: the dataset name.

  Returns:
    Config overrides that train on it: ``{"data.path": <dataset directory>}``.
  """
  if c.teacher.source != "random":
    raise ValueError(f"write_cpu_teacher_cache() caches a random CPU teacher; teacher.source is"
                     f" {c.teacher.source!r} (use `python -m jkd.data.teacher_cache` for it).")
  path = os.path.join(os.path.expanduser(workdir), name, "1.0.0")
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return {"data.path": path}
  spec = build.teacher_spec(c)
  mesh = sharding.make_mesh(tuple(c.mesh.shape))
  teacher = build.build_teacher(spec, mesh, sharding.DEFAULT_RULES,
                                jax.random.fold_in(jax.random.key(int(c.seed)), 0))
  examples = synthetic_lm_examples(num_examples, int(c.data.seq_len),
                                        spec.config.vocab_size, seed=int(c.data.seed))
  path = teacher_cache.write_teacher_cache(examples, workdir, params=teacher.params,
                                           config=spec.config, k=k, name=name,
                                           teacher="random (cpu variant)", progress=False)
  return {"data.path": path}


def token_kd_cpu_data(c, workdir: str, arg: str) -> dict[str, Any]:
  """What the CPU variants of the token-KD recipes read from disk (``configs/kd_forward.py``,
  ``configs/kd_gjsd.py``): the teacher cache of ``cpu_cache``; nothing for ``cpu``."""
  return write_cpu_teacher_cache(c, workdir) if arg == "cpu_cache" else {}
