"""One explicit setup: a run's pieces built from its config, without running anything.

:func:`setup` gives a :class:`Run`: the mesh, the teacher's spec (its config, and how to read
its weights later), the student's config, the objective, the optimizer and its schedule, the
train state's shapes and shardings (``jax.ShapeDtypeStruct`` leaves: no device memory), and the
jitted train step. Nothing is read but the models' configs (a GGUF teacher's file is read with
its tensors), so a run can be planned or compiled for hardware it does not run on::

    run = setup(config)
    lowered = run.lower({"tokens": (16, 2048), "labels": (16, 2048)})
    print(lowered.compile().memory_analysis())

:func:`jkd.train.train` builds its run with :func:`setup`, then makes the concrete state (fresh
or restored) and loops.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jkd import losses
from jkd import models
from jkd import partitioning
from jkd.data import examples
from jkd.train import build
from jkd.train import evaluate as eval_lib
from jkd.train import sharding
from jkd.train import storage
from jkd.train import teachers as teachers_lib
from jkd.train.step import TrainState, make_optimizer, make_train_step

PyTree = Any

#: ``fold_in`` indices of the run's seed key: teacher init, student init, per-step key, terms.
TEACHER_KEY, STUDENT_KEY, STEP_KEY, TERMS_KEY = 0, 1, 2, 3


def check_config(cfg) -> None:
  """The training keys that no other builder checks (a clear error names the key)."""
  lr = float(cfg.optimizer.lr)
  if not math.isfinite(lr) or lr <= 0:
    raise ValueError(f"optimizer.lr must be a positive finite number (got {lr}).")
  for key in ("steps", "max_nan_steps", "log_every", "grad_accum"):
    if int(cfg.train[key]) < 1:
      raise ValueError(f"train.{key} must be >= 1 (got {cfg.train[key]}).")
  best, every, eval_every = cfg.checkpoint.best_metric, cfg.checkpoint.every, cfg.eval.every
  if best and best not in eval_lib.METRIC_NAMES:
    raise ValueError(f"checkpoint.best_metric {best!r} is not an eval metric; choose one of"
                     f" {list(eval_lib.METRIC_NAMES)}.")
  if best and (eval_every <= 0 or every <= 0 or every % eval_every):
    raise ValueError(f"checkpoint.best_metric needs an evaluation at every checkpoint: make"
                     f" checkpoint.every ({every}) a multiple of eval.every ({eval_every}).")
  for key, low in (("data.seq_len", 1), ("data.batch_size", 1), ("checkpoint.keep", 1),
                   ("checkpoint.every", 0), ("eval.every", 0), ("eval.batches", 0),
                   ("optimizer.warmup_steps", 0)):
    section, name = key.split(".")
    if int(cfg[section][name]) < low:
      raise ValueError(f"{key} must be >= {low} (got {cfg[section][name]}).")
  o = cfg.optimizer
  for key, ok, rule in (("end_lr_ratio", 0 <= o.end_lr_ratio <= 1, "in [0, 1]"),
                        ("b1", 0 <= o.b1 < 1, "in [0, 1)"), ("b2", 0 <= o.b2 < 1, "in [0, 1)"),
                        ("eps", o.eps > 0, "> 0"), ("weight_decay", o.weight_decay >= 0, ">= 0"),
                        ("clip_norm", o.clip_norm >= 0, ">= 0 (0: no clipping)")):
    if not ok:
      raise ValueError(f"optimizer.{key} must be {rule} (got {o[key]}).")
  for key, allowed in (("data.overflow", examples.OVERFLOW),
                       ("data.shape", ("",) + examples.TEXT_SHAPES[:3] + ("tokenized",
                                                                         "unpaired"))):
    section, name = key.split(".")
    if cfg[section][name] not in allowed:
      raise ValueError(f"{key} must be one of {list(allowed)} (got {cfg[section][name]!r}).")
  if cfg.checkpoint.best_mode not in ("min", "max"):
    raise ValueError(f"checkpoint.best_mode must be 'min' or 'max' (got"
                     f" {cfg.checkpoint.best_mode!r}).")
  reference = str(cfg.data.get("select_reference", "") or "")
  if storage.is_remote(reference):
    raise ValueError(
        f"data.select_reference={reference}: the reference model of data selection is read from"
        " a local or mounted path; copy it to a local disk first (gcloud storage cp -r ...).")
  if cfg.data.batch_size % int(cfg.train.grad_accum):
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by"
                     f" train.grad_accum {cfg.train.grad_accum}.")


def check_batch(cfg, mesh: Mesh, rules) -> None:
  """``data.batch_size`` must split evenly over the mesh's batch axes and the processes."""
  spec = sharding.batch_sharding(mesh, rules).spec[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  shards = math.prod(mesh.shape[a] for a in axes)
  batch = int(cfg.data.batch_size)
  if batch < 1:
    raise ValueError(f"data.batch_size must be >= 1 (got {batch}).")
  if batch % shards:
    fit = -(-batch // shards) * shards
    raise ValueError(
        f"data.batch_size {batch} does not split over the {shards} devices of the mesh's batch"
        f" axes ({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}, mesh.shape"
        f" {tuple(mesh.shape.values())}): make it a multiple of {shards} (e.g. {fit}) or set"
        " mesh.shape to use fewer devices for the batch.")
  accum = int(cfg.train.grad_accum)
  if (batch // shards) % accum:
    raise ValueError(
        f"train.grad_accum {accum} does not split the {batch // shards} rows each device holds"
        f" (data.batch_size {batch} over {shards} devices of the batch axes): make"
        f" data.batch_size a multiple of {shards * accum}, or lower train.grad_accum.")
  if batch % jax.process_count():
    raise ValueError(f"data.batch_size {batch} does not split over {jax.process_count()}"
                     " processes: make it a multiple of the process count.")


def check_seq_len(cfg, *model_configs: models.ModelConfig) -> None:
  """``data.seq_len`` must not exceed the models' ``max_position_embeddings`` (for runs that
  read the config's data; a source passed to :func:`jkd.train.train` has its own length).
  ``model_configs``: the teacher, the student, then any further teachers."""
  seq_len = int(cfg.data.seq_len)
  names = ("teacher", "student") + tuple(f"teacher {i}" for i in range(1, len(model_configs)))
  for name, model in zip(names, model_configs):
    if seq_len > model.max_position_embeddings:
      raise ValueError(f"data.seq_len {seq_len} is longer than the {name}'s"
                       f" max_position_embeddings ({model.max_position_embeddings}): lower"
                       " data.seq_len (longer rows would use positions the model never saw).")


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """A run's pieces (see the module docstring); make it with :func:`setup`.

  Attributes:
    config: the run's config.
    mesh, rules: the device mesh and the logical-axis rules.
    key: the run's seed key (``fold_in`` it with :data:`TEACHER_KEY`, ...).
    teacher_spec: the teacher's config and weight loader (:class:`jkd.train.build.TeacherSpec`);
      with several teachers, teacher 0's.
    student_config: the student's config.
    objective, optimizer, schedule: what the step optimises, and how.
    online: whether the teacher runs inside the step (``teacher.online``).
    abstract_state: the train state's shapes, each leaf carrying its sharding.
    state_shardings: the train state's shardings.
    routing: how several teachers are combined (:class:`jkd.train.teachers.Routing`), or None
      for one teacher.
    teacher_specs: every teacher's spec, teacher 0 (``teacher_spec``) first.
    teacher_param_dtypes: every teacher's frozen parameter dtype.
  """
  config: Any
  mesh: Mesh
  rules: tuple
  key: jax.Array
  teacher_spec: build.TeacherSpec
  student_config: models.ModelConfig
  objective: losses.Objective
  optimizer: optax.GradientTransformation
  schedule: Callable
  online: bool
  abstract_state: TrainState
  state_shardings: TrainState
  routing: teachers_lib.Routing | None = None
  teacher_specs: tuple = ()
  teacher_param_dtypes: tuple = ()

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  @property
  def step_teacher_config(self) -> models.ModelConfig | tuple | None:
    """The teacher inside the step (parameters in ``teacher.param_dtype``), or None; with
    several teachers a tuple of their configs (each in its own parameter dtype)."""
    if not self.online:
      return None
    if self.routing is not None:
      return tuple(s.config.replace(param_dtype=d)
                   for s, d in zip(self.teacher_specs, self.teacher_param_dtypes))
    return self.teacher_spec.config.replace(param_dtype=self.config.teacher.param_dtype)

  def teacher_key(self, index: int = 0) -> jax.Array:
    """The init key of teacher ``index`` (a random teacher): teacher 0's is the run's teacher
    key, teacher ``i``'s that key folded with ``i``."""
    key = jax.random.fold_in(self.key, TEACHER_KEY)
    return key if index == 0 else jax.random.fold_in(key, index)

  def teacher_shardings(self) -> PyTree | None:
    """Shardings of the step's teacher parameters (None without a teacher in the step; a
    tuple with several teachers)."""
    config = self.step_teacher_config
    if isinstance(config, tuple):
      return tuple(build.param_shardings(c, self.mesh, self.rules) for c in config)
    return None if config is None else build.param_shardings(config, self.mesh, self.rules)

  def abstract_teacher(self) -> PyTree | None:
    """The step's teacher parameters as sharded ``ShapeDtypeStruct`` leaves (or None; a tuple
    with several teachers)."""
    config = self.step_teacher_config
    if config is None:
      return None
    configs = config if isinstance(config, tuple) else (config,)
    shardings = self.teacher_shardings()
    shardings = shardings if isinstance(config, tuple) else (shardings,)
    out = tuple(jax.tree.map(
        lambda a, s, c=c: jax.ShapeDtypeStruct(a.shape, jnp.dtype(c.param_dtype), sharding=s),
        build.abstract_params(c)[0], sh) for c, sh in zip(configs, shardings))
    return out if isinstance(config, tuple) else out[0]

  def term_params(self) -> PyTree:
    """The loss terms' initial trainable parameters (:func:`jkd.train.build.term_params`), and
    the teachers' gate's (``routing="gate"``)."""
    return build.term_params(self.objective, jax.random.fold_in(self.key, TERMS_KEY),
                             self.student_config, self.step_teacher_config,
                             routing=self.routing)

  def step_key(self) -> jax.Array:
    """The replicated base key of the per-step keys."""
    return jax.jit(lambda: jax.random.fold_in(self.key, STEP_KEY),
                   out_shardings=self.replicated)()

  def train_step(self) -> Callable:
    """``(state, batch, step_key, teacher_params) -> (state, metrics)``, the step's key folded
    from the step number (a resumed run draws the same keys)."""
    step_fn = make_train_step(student_config=self.student_config,
                              teacher_config=self.step_teacher_config,
                              objective=self.objective, optimizer=self.optimizer,
                              schedule=self.schedule,
                              grad_accum=int(self.config.train.grad_accum),
                              routing=self.routing if self.online else None)

    def step(state, batch, step_key, teacher_params):
      with partitioning.activation_sharding(self.mesh, self.rules):  # Traced on this mesh.
        return step_fn(state, batch, jax.random.fold_in(step_key, state.step), teacher_params)

    return step

  def jit_step(self, batch_shardings: Mapping[str, Any]) -> Callable:
    """The step jitted with explicit shardings, the state donated (the teacher is not)."""
    return jax.jit(self.train_step(),
                   in_shardings=(self.state_shardings, dict(batch_shardings), self.replicated,
                                 self.teacher_shardings()),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def lower(self, batch_shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, Any]
            | None = None):
    """The step lowered for global batches of ``batch_shapes`` (int32 unless ``dtypes`` says
    otherwise), from shapes alone: ``.compile()`` it for this mesh's devices. With
    ``teachers.routing='field'`` include the routing field (e.g. ``"domain": (batch,)``)."""
    dtypes = dict(dtypes or {})
    batch = {k: jax.ShapeDtypeStruct(tuple(s), dtypes.get(k, jnp.int32),
                                     sharding=sharding.batch_sharding(self.mesh, self.rules,
                                                                      ndim=len(s)))
             for k, s in batch_shapes.items()}
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: self.key).dtype,
                               sharding=self.replicated)
    shardings = {k: v.sharding for k, v in batch.items()}
    return self.jit_step(shardings).lower(self.abstract_state, batch, key,
                                          self.abstract_teacher())


def setup(config, *, teacher_config: models.ModelConfig | None = None,
          devices=None) -> Run:
  """A :class:`Run` from a config, without running anything (see the module docstring).

  Args:
    config: a training config (:func:`jkd.train.config.default_config` keys).
    teacher_config: the teacher's config when its weights are already built (then its
      ``teacher.source`` is not read again; with several teachers, teacher 0's).
    devices: the devices of the mesh (default ``jax.devices()``; e.g. the devices of a TPU
      topology to compile for).

  Raises:
    ValueError: a bad config, named by its key (several teachers: also a teacher list whose
      vocabularies differ without a cross-tokenizer term, or a term that needs one teacher's
      features; :mod:`jkd.train.teachers`).
  """
  cfg = config
  check_config(cfg)
  routing = teachers_lib.routing_from_config(cfg)  # (reads no model)
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape), devices=devices)
  rules = sharding.DEFAULT_RULES
  check_batch(cfg, mesh, rules)
  spec = (build.TeacherSpec(teacher_config, None) if teacher_config is not None
          else build.teacher_spec(cfg))  # (a GGUF spec reads the file)
  student_config = build.student_config(cfg, spec.config)
  objective = losses.build_objective(cfg.objective)
  specs, param_dtypes = (spec,), (str(cfg.teacher.param_dtype),)
  if routing is not None:
    teachers_lib.check_objective(objective, routing)
    extra = build.extra_teacher_specs(cfg)
    specs += tuple(s for s, _ in extra)
    param_dtypes += tuple(d for _, d in extra)
    teachers_lib.check_vocabularies([s.config.vocab_size for s in specs],
                                    student_config.vocab_size,
                                    cross_tokenizer=build.cross_tokenizer(objective),
                                    routing=routing)
  build.check_tokenizers(cfg, objective, spec.config, student_config)
  optimizer, schedule = make_optimizer(cfg.optimizer.to_dict(), int(cfg.train.steps))
  key = jax.random.key(int(cfg.seed))
  online = bool(cfg.teacher.online)
  terms_teacher = spec.config if online else None
  term_shapes = jax.eval_shape(lambda: build.term_params(
      objective, jax.random.fold_in(key, TERMS_KEY), student_config, terms_teacher,
      routing=routing))
  abstract_state, state_shardings = build.state_shardings(student_config, optimizer, objective,
                                                          mesh, rules, term_shapes)
  return Run(config=cfg, mesh=mesh, rules=rules, key=key, teacher_spec=spec,
             student_config=student_config, objective=objective, optimizer=optimizer,
             schedule=schedule, online=online, abstract_state=abstract_state,
             state_shardings=state_shardings, routing=routing, teacher_specs=specs,
             teacher_param_dtypes=param_dtypes)
