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
                            name: str = "teacher_cache", heldout_examples: int = 0,
                            calibrate: bool = False, privacy=None) -> dict[str, Any]:
  """An offline top-``k`` cache of a CPU variant's random teacher over synthetic sequences.

  The teacher is the one training builds from ``c`` (same seed, same parameters), so the cache
  holds what ``teacher.online=True`` computes in the step. An existing cache is reused.

  Args:
    c: the CPU variant's config (``teacher.source="random"``).
    workdir: the TFDS root the cache is written under (``workdir/name/1.0.0``).
    k: top-k ids per position.
    num_examples: cached sequences of ``c.data.seq_len`` tokens.
    name: the dataset name.
    heldout_examples: more sequences of the same chain, cached as the split ``eval`` (the
      student's evaluation) and, with ``calibrate``, FIRST's held-out data.
    calibrate: FIRST's calibrated targets (``write_teacher_cache(calibrate_on=...)``).
    privacy: Swing's private targets, a :class:`jkd.data.privacy.PrivacySpec`.

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
  examples = synthetic_lm_examples(num_examples + heldout_examples, int(c.data.seq_len),
                                        spec.config.vocab_size, seed=int(c.data.seed))
  heldout = {key: v[num_examples:] for key, v in examples.items()} if heldout_examples else None
  examples = {key: v[:num_examples] for key, v in examples.items()}
  path = teacher_cache.write_teacher_cache(examples, workdir, params=teacher.params,
                                           config=spec.config, k=k, name=name,
                                           teacher="random (cpu variant)", progress=False,
                                           eval_examples=heldout,
                                           calibrate_on=heldout if calibrate else None,
                                           privacy=privacy)
  return {"data.path": path}


def token_kd_cpu_data(c, workdir: str, arg: str) -> dict[str, Any]:
  """What the CPU variants of the token-KD recipes read from disk (``configs/kd_forward.py``,
  ``configs/kd_gjsd.py``): the teacher cache of ``cpu_cache``; nothing for ``cpu``."""
  return write_cpu_teacher_cache(c, workdir) if arg == "cpu_cache" else {}


def write_cpu_domain_teachers(c, workdir: str, *, steps: int, lr: float = 3e-3,
                              batch_size: int = 16) -> dict[str, str]:
  """Tiny teachers of :data:`jkd.train.recipes.CPU_TEACHER`'s shape trained on the synthetic
  domains of ``c`` (``data.source="domains"``, :func:`jkd.train.sources.ddk.
  synthetic_domain_examples`, train split), saved as Hugging Face directories under ``workdir``:
  one specialist per domain (``d0``, ``d1``, ...) trained on that domain alone, and ``union``
  trained on all of them together, each with cross-entropy for ``steps`` steps of
  ``batch_size`` sequences (the engine's train step; seed ``c.seed``). Existing directories
  are reused.

  Returns:
    ``{name: directory}`` (``"d0"``, ..., ``"union"``).
  """
  import numpy as np  # noqa: PLC0415
  from jkd import losses, models  # noqa: PLC0415
  from jkd.data.arrays import ArraySource  # noqa: PLC0415
  from jkd.train import recipes  # noqa: PLC0415
  from jkd.train import step as step_lib  # noqa: PLC0415
  from jkd.train.sources import ddk  # noqa: PLC0415
  config = models.ModelConfig(**recipes.CPU_TEACHER)
  train, _ = ddk.synthetic_domain_examples(c, config.vocab_size)
  sets = dict(train)
  sets["union"] = {k: np.concatenate([ex[k] for ex in train.values()]) for k in
                   next(iter(train.values()))}
  out = {name: os.path.join(os.path.expanduser(workdir), f"teacher_{name}") for name in sets}
  if all(os.path.exists(os.path.join(d, "config.json")) for d in out.values()):
    return out
  objective = losses.build_objective({"ce": {"term": "cross_entropy"}})
  optimizer, schedule = step_lib.make_optimizer(
      {"lr": lr, "warmup_steps": 1, "weight_decay": 0.0}, steps)
  step = jax.jit(step_lib.make_train_step(student_config=config, teacher_config=None,
                                          objective=objective, optimizer=optimizer,
                                          schedule=schedule), donate_argnums=0)
  init = jax.random.key(int(c.seed))
  fresh = jax.jit(lambda k: step_lib.init_state(models.init_params(config, k), optimizer,
                                                objective))
  for name, examples in sets.items():
    state = fresh(init)
    source = ArraySource({k: v for k, v in examples.items() if k != "domain"}, batch_size,
                         seed=int(c.seed), process_index=0, process_count=1)
    for _ in range(steps):
      state, _ = step(state, next(source), init)
    models.save_hf(out[name], jax.device_get(state.params), config)
  return out
