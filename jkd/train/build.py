"""Teacher and student from a config, placed on the mesh; the train state created sharded.

Sources are explicit registries: :data:`TEACHER_SOURCES` (``teacher.source``) and
:data:`STUDENT_SOURCES` (``student.source``). Random models are initialised directly in their
shardings (``jax.jit(init, out_shardings=...)``); loaded ones are put into them tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jkd import losses
from jkd import models
from jkd import students
from jkd.data import model_spec
from jkd.data import tokenizers
from jkd.train import checkpoint as ckpt_lib
from jkd.train import sharding
from jkd.train import storage
from jkd.train import teachers as teachers_lib
from jkd.train.step import TrainState, init_state, init_term_params

PyTree = Any


def _choose(registry: Mapping[str, Any], name: str, what: str):
  if name not in registry:
    raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(registry)}.")
  return registry[name]


def _path(section, key: str) -> str:
  if not section.path:
    raise ValueError(f"{key}.source={section.source} needs a path: set --config.{key}.path=...")
  return os.path.expanduser(section.path)


def _model_fields(section) -> dict[str, Any]:
  """The set (non-None) entries of a ``model`` config section (``rope_scaling`` as a tuple)."""
  fields = {k: v for k, v in section.to_dict().items() if v is not None}
  if "rope_scaling" in fields:
    scaling = tuple(fields["rope_scaling"])
    if len(scaling) != 4:
      raise ValueError(f"rope_scaling {scaling} must be the Llama-3 tuple (factor,"
                       " low_freq_factor, high_freq_factor, original_max_position_embeddings),"
                       " e.g. (32.0, 1.0, 4.0, 8192).")
    fields["rope_scaling"] = (float(scaling[0]), float(scaling[1]), float(scaling[2]),
                              int(scaling[3]))
  return fields


def _reshard(params: PyTree, shardings: PyTree) -> PyTree:
  """Loaded parameters into ``shardings`` (via the host: the same values on every process)."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


# ---------------------------------------------------------------------------------------------
# Teachers.

class TeacherSpec(NamedTuple):
  """A teacher's config and how to read its parameters (``load(shardings) -> params``, or None
  for a random init): the config alone decides the student's shapes, so a resumed run checks
  its checkpoint before the teacher's weights are read (GGUF files excepted: their config is
  read with the tensors)."""
  config: models.ModelConfig
  load: Callable[[PyTree], PyTree] | None


def teacher_model_spec(cfg) -> str:
  """The teacher's model spec (:mod:`jkd.data.model_spec`): ``teacher.source`` as written
  (``smollm2``, ``gguf:PATH``, ``hf:DIR``), or ``gguf``/``hf`` joined with ``teacher.path``;
  ``""`` for a ``random`` teacher (of ``teacher.model``).

  Raises:
    ValueError: an unknown source, or ``gguf``/``hf`` without a path.
  """
  source = str(cfg.teacher.source)
  kind = source.partition(":")[0]
  if kind not in TEACHER_SOURCES:
    raise ValueError(f"unknown teacher.source {source!r}; choose one of"
                     f" {sorted(TEACHER_SOURCES)} (or a model spec such as gguf:PATH).")
  if source == "random":
    return ""
  if source in ("gguf", "hf"):
    return f"{source}:{_path(cfg.teacher, 'teacher')}"
  model_spec.parse_spec(source)
  return source


def _gguf(path: str) -> TeacherSpec:
  config, params = models.load_gguf(path)
  return TeacherSpec(config, lambda shardings: _reshard(params, shardings))


def _hf(path: str) -> TeacherSpec:
  return TeacherSpec(model_spec.model_config(f"hf:{path}"),
                     lambda shardings: models.load_hf(path, shardings=shardings)[1])


#: The kind of ``teacher.source`` (``random`` or a model spec's kind) -> ``(cfg, spec argument)
#: -> TeacherSpec``.
TEACHER_SOURCES: dict[str, Callable[[Any, str], TeacherSpec]] = {
    "random": lambda cfg, arg: TeacherSpec(
        models.ModelConfig(**_model_fields(cfg.teacher.model)), None),
    "hf": lambda cfg, path: _hf(path),
    "gguf": lambda cfg, path: _gguf(path),
    "smollm2": lambda cfg, arg: _gguf(models.smollm2_gguf_path()),
}


def teacher_spec(cfg) -> TeacherSpec:
  """The ``teacher.source`` teacher's config (compute dtype ``teacher.dtype``) and loader."""
  spec = teacher_model_spec(cfg)
  kind, arg = model_spec.parse_spec(spec) if spec else ("random", "")
  if kind in ("hf", "gguf"):  # A gs:// model is copied to data.cache_dir once.
    arg = storage.localize(arg, cfg.data.cache_dir)
  built = TEACHER_SOURCES[kind](cfg, arg)
  return built._replace(config=built.config.replace(dtype=cfg.teacher.dtype))


def _spec_teacher(cfg, spec: str) -> TeacherSpec:
  """A teacher named by a model spec (``random`` takes ``teacher.model``; ``random:{json}`` its
  own config and ``"seed"``), not yet in a compute dtype."""
  if spec == "random":
    return TEACHER_SOURCES["random"](cfg, "")
  kind, arg = model_spec.parse_spec(spec)
  if kind == "random":
    config = model_spec.model_config(spec)
    seed = int(json.loads(arg).get("seed", 0))
    return TeacherSpec(config, lambda shardings: jax.jit(
        lambda k: models.init_params(config, k), out_shardings=shardings)(jax.random.key(seed)))
  if kind in ("hf", "gguf"):
    arg = storage.localize(arg, cfg.data.cache_dir)
  return TEACHER_SOURCES[kind](cfg, arg)


def extra_teacher_specs(cfg) -> tuple[tuple[TeacherSpec, str], ...]:
  """Teachers ``1 .. N-1`` of a several-teacher run (``teachers.specs``, see
  :mod:`jkd.train.teachers`): ``(spec in its compute dtype, parameter dtype)`` each. A
  ``random`` teacher is drawn from ``Run.teacher_key(i)`` when it is built.

  Raises:
    ValueError: a bad model spec, naming the forms it can take.
  """
  out = []
  for spec, dtype, param_dtype in teachers_lib.extra_teachers(cfg):
    built = _spec_teacher(cfg, spec)
    out.append((built._replace(config=built.config.replace(dtype=dtype)), param_dtype))
  return tuple(out)


class Teacher(NamedTuple):
  """The teacher: sharded parameters (never donated, never checkpointed) and its config. With
  several teachers (:func:`combine_teachers`) each field is a tuple, one entry per teacher."""
  config: models.ModelConfig | tuple
  params: PyTree
  shardings: PyTree


def combine_teachers(teachers: list[Teacher]) -> Teacher:
  """One :class:`Teacher` of tuples (configs, params, shardings) from several, in order: what the
  step of a several-teacher run takes."""
  return Teacher(tuple(t.config for t in teachers), tuple(t.params for t in teachers),
                 tuple(t.shardings for t in teachers))


@functools.lru_cache(maxsize=16)
def abstract_params(config: models.ModelConfig) -> tuple[PyTree, PyTree]:
  """``(ShapeDtypeStruct tree, logical-axis tree)`` of a model's parameters (traced once)."""
  return (jax.eval_shape(lambda: models.init_params(config, jax.random.key(0))),
          models.param_axes(config))


def param_shardings(config: models.ModelConfig, mesh: Mesh, rules) -> PyTree:
  """``NamedSharding`` of every parameter of a ``config`` model, from the logical axes."""
  return sharding.shardings_for(*abstract_params(config), mesh, rules)


def build_teacher(spec: TeacherSpec, mesh: Mesh, rules, key: jax.Array) -> Teacher:
  """The teacher's float32 parameters, read (or drawn) into their shardings."""
  config = spec.config
  shardings = param_shardings(config, mesh, rules)
  if spec.load is None:
    params = jax.jit(lambda k: models.init_params(config, k), out_shardings=shardings)(key)
  else:
    params = spec.load(shardings)
  return Teacher(config, params, shardings)


def freeze_teacher(teacher: Teacher, param_dtype: str) -> Teacher:
  """The teacher with parameters cast to ``param_dtype`` (e.g. ``bfloat16``), same shardings."""
  if param_dtype == teacher.config.param_dtype:
    return teacher
  dtype = jnp.dtype(param_dtype)
  params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                   out_shardings=teacher.shardings)(teacher.params)
  return Teacher(teacher.config.replace(param_dtype=param_dtype), params, teacher.shardings)


# ---------------------------------------------------------------------------------------------
# Students.

class StudentSource(NamedTuple):
  """How a ``student.source`` makes the student.

  Attributes:
    config: ``(cfg, teacher_config, path) -> ModelConfig`` (reads no parameters).
    params: ``(cfg, student_config, teacher, path, shardings, key, calibration) -> params``
      in ``shardings`` (called for a fresh run only; a resumed run restores its state).
      ``calibration(n)`` gives ``n`` batches of the run's training data (the ``prune`` source
      measures the teacher's importance on them), or is None where there are none.
  """
  config: Callable[..., models.ModelConfig]
  params: Callable[..., PyTree]


def _random_params(cfg, config, teacher, path, shardings, key, calibration=None):
  del cfg, teacher, path, calibration
  return jax.jit(lambda k: models.init_params(config, k), out_shardings=shardings)(key)


def _layers_config(cfg, teacher_config, path):
  del path
  every, n = int(cfg.student.every), teacher_config.num_layers
  if not 1 <= every <= n:
    raise ValueError(f"student.every must be in [1, {n}] (the teacher's {n} layers; the student"
                     f" keeps every student.every-th of them), got {every}.")
  keep = models.layers_every(n, every)
  return teacher_config.replace(num_layers=len(keep))


def _layers_params(cfg, config, teacher, path, shardings, key, calibration=None):
  del config, path, key, calibration
  every = int(cfg.student.every)
  return jax.jit(lambda p: models.student_from_teacher(p, teacher.config, every=every)[1],
                 out_shardings=shardings)(teacher.params)


def _checkpoint_config(cfg, teacher_config, path):
  del cfg, teacher_config
  stored = ckpt_lib.read_config(path).get("student_model")
  if not stored:
    raise ValueError(f"the checkpoint under {path!r} does not record its student model.")
  return models.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in stored.items()})


def _checkpoint_params(cfg, config, teacher, path, shardings, key, calibration=None):
  del cfg, teacher, key, calibration
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(config)[0], shardings)
  return ckpt_lib.restore_params(path, abstract)


#: ``student.prune`` keys that size the student (0: the teacher's).
PRUNE_SIZES = ("num_layers", "intermediate_size", "num_heads", "hidden_size")


def _prune_candidate(cfg, teacher_config) -> students.Candidate:
  p = cfg.student.prune
  sizes = {k: int(p[k]) for k in PRUNE_SIZES if int(p[k])}
  try:
    students.check_sizes(teacher_config, **sizes)
  except ValueError as e:
    raise ValueError(f"student.prune: {e}") from None
  if str(p.layers_by) not in students.LAYER_SCORES:
    raise ValueError(f"student.prune.layers_by must be one of {list(students.LAYER_SCORES)},"
                     f" got {p.layers_by!r}.")
  if int(p.calibration_batches) < 1:
    raise ValueError("student.prune.calibration_batches must be >= 1 (got"
                     f" {p.calibration_batches}): the importance is measured on them.")
  return students.Candidate("prune", **sizes)


def _prune_config(cfg, teacher_config, path):
  del path
  return students.shape(teacher_config, _prune_candidate(cfg, teacher_config))


def _prune_params(cfg, config, teacher, path, shardings, key, calibration=None):
  """The teacher pruned by its importance on the first training batches (jkd.students)."""
  del config, path, key
  if calibration is None:
    raise ValueError("student.source=prune measures the teacher on the run's training data,"
                     " and this run has none to give it.")
  p = cfg.student.prune
  candidate = _prune_candidate(cfg, teacher.config)
  removal = (p.layers_by == "removal" and candidate.num_layers is not None
             and candidate.num_layers < teacher.config.num_layers)
  importance = students.measure(teacher.params, teacher.config,
                                calibration(int(p.calibration_batches)), removal=removal)
  _, params = students.prune(teacher.params, teacher.config, importance,
                             layers_by=str(p.layers_by),
                             **{k: v for k, v in candidate._asdict().items() if k != "name"})
  return jax.device_put(params, shardings)


#: ``student.source`` -> how to make the student.
STUDENT_SOURCES: dict[str, StudentSource] = {
    "layers": StudentSource(_layers_config, _layers_params),
    "prune": StudentSource(_prune_config, _prune_params),
    "random": StudentSource(
        lambda cfg, t, path: t.replace(**_model_fields(cfg.student.model)), _random_params),
    "hf": StudentSource(lambda cfg, t, path: model_spec.model_config(f"hf:{path}"),
                        lambda cfg, c, t, path, sh, key, calibration=None: models.load_hf(
                            path, shardings=sh)[1]),
    "checkpoint": StudentSource(_checkpoint_config, _checkpoint_params),
}


def student_source(cfg) -> tuple[StudentSource, str]:
  """The student's source and path; ``student.init_from`` (a Hugging Face directory or a jkd
  workdir/checkpoint) overrides ``student.source`` and ``student.path``."""
  if cfg.student.init_from:
    path = storage.localize(os.path.expanduser(cfg.student.init_from), cfg.data.cache_dir)
    try:
      ckpt_lib.find_checkpoint(path)
      name = "checkpoint"
    except FileNotFoundError:
      if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"student.init_from={path!r} is neither a jkd workdir or"
                                " checkpoint nor a Hugging Face directory (no config.json)."
                                ) from None
      name = "hf"
    return STUDENT_SOURCES[name], path
  source = _choose(STUDENT_SOURCES, cfg.student.source, "student.source")
  needs_path = cfg.student.source in ("hf", "checkpoint")
  return source, (storage.localize(_path(cfg.student, "student"), cfg.data.cache_dir)
                  if needs_path else "")


def student_config(cfg, teacher_config: models.ModelConfig) -> models.ModelConfig:
  """The student's ModelConfig (compute dtype ``student.dtype``, float32 parameters, layers
  unrolled when ``student.unroll_layers``)."""
  source, path = student_source(cfg)
  config = source.config(cfg, teacher_config, path)
  return config.replace(dtype=cfg.student.dtype, param_dtype="float32",
                        remat=bool(cfg.student.remat),
                        scan_unroll=config.num_layers if cfg.student.unroll_layers else 1)


def student_params(cfg, config: models.ModelConfig, teacher: Teacher, shardings: PyTree,
                   key: jax.Array, calibration: Callable[[int], list] | None = None) -> PyTree:
  """The student's initial parameters, in ``shardings`` (for a fresh run); ``calibration(n)``:
  ``n`` training batches (see :class:`StudentSource`)."""
  source, path = student_source(cfg)
  return source.params(cfg, config, teacher, path, shardings, key, calibration)


def peek_batches(source, n: int) -> list:
  """The next ``n`` batches of a training source, which is then rewound (``get_state`` /
  ``set_state``); a wrapping source (on-policy) is read through its ``inner`` data."""
  while hasattr(source, "inner") and hasattr(source.inner, "get_state"):
    source = source.inner
  state = source.get_state()
  try:
    return [next(source) for _ in range(n)]
  finally:
    source.set_state(state)


# ---------------------------------------------------------------------------------------------
# The train state.

def state_shardings(config: models.ModelConfig, optimizer: optax.GradientTransformation,
                    objective: losses.Objective, mesh: Mesh, rules,
                    term_params: PyTree | None = None) -> tuple[TrainState, TrainState]:
  """``(abstract state whose leaves carry their sharding, state shardings)`` of a student
  (:func:`jkd.train.sharding.state_shardings`: Adam's moments follow their parameters).

  ``term_params``: the loss terms' trainable parameters, or their shapes (see
  :func:`jkd.train.step.init_term_params`).
  """
  abstract = jax.eval_shape(lambda p, tp: init_state(p, optimizer, objective, tp),
                            abstract_params(config)[0], term_params)
  shardings = sharding.state_shardings(abstract, param_shardings(config, mesh, rules),
                                       optimizer, mesh)
  with_sharding = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return with_sharding, shardings


def term_params(objective: losses.Objective, key: jax.Array,
                student_config: models.ModelConfig,
                teacher_config: models.ModelConfig | tuple | None, *,
                routing: teachers_lib.Routing | None = None) -> PyTree:
  """The loss terms' trainable parameters (e.g. ``hidden_state`` projections between widths),
  from the models' shapes alone (no weights read); ``teacher_config`` None: no teacher in the
  step. Under ``jax.eval_shape`` it gives their shapes. Several teachers (``routing``): the
  terms see no single teacher, and a ``gate`` routing adds the gate's parameters under
  :data:`jkd.train.teachers.GATE` (zeros: uniform weights)."""
  if routing is not None:
    teacher_config = None
  teacher_params = None if teacher_config is None else abstract_params(teacher_config)[0]
  params = init_term_params(objective, key, params=abstract_params(student_config)[0],
                            teacher_params=teacher_params, student_config=student_config,
                            teacher_config=teacher_config)
  if routing is not None and routing.kind == "gate":
    params = {**params, teachers_lib.GATE: teachers_lib.init_gate(student_config.hidden_size,
                                                                  routing.num_teachers)}
  return params


def create_state(params: PyTree, optimizer: optax.GradientTransformation,
                 objective: losses.Objective, shardings: TrainState,
                 term_params: PyTree | None = None) -> TrainState:
  """A fresh train state from ``params`` (and the loss terms' ``term_params``), made directly
  in ``shardings``."""
  return jax.jit(lambda p, tp: init_state(p, optimizer, objective, tp),
                 out_shardings=shardings)(params, term_params)


def model_record(config: models.ModelConfig) -> dict[str, Any]:
  """JSON form of a ModelConfig (stored with each checkpoint)."""
  return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------
# Tokenizers.

def _no_tokenizer(cfg):
  raise ValueError("a text dataset needs a teacher with a tokenizer: teacher.source 'random'"
                   " has none; use teacher.source smollm2, gguf or hf, or tokenized data"
                   " (data.shape='tokenized', data.source='npz' or 'synthetic').")


def tokenizer_for(cfg):
  """The teacher's ``transformers`` tokenizer (from its model spec, :func:`teacher_model_spec`;
  or a character-level one of ``teacher.model.vocab_size`` ids when ``teacher.tokenizer='char'``).

  Raises:
    ValueError: a ``random`` teacher (no tokenizer) or an unknown source.
  """
  if cfg.teacher.get("tokenizer") == "char":
    return model_spec.char_tokenizer(int(cfg.teacher.model.vocab_size))
  if cfg.teacher.get("tokenizer"):
    raise ValueError(f"unknown teacher.tokenizer {cfg.teacher.tokenizer!r}; use '' (the"
                     " teacher's own) or 'char'.")
  spec = teacher_model_spec(cfg)
  if not spec:
    _no_tokenizer(cfg)
  kind, arg = model_spec.parse_spec(spec)
  return models.load_tokenizer(models.smollm2_gguf_path() if kind == "smollm2" else arg)


#: Objective terms that compare teacher and student without a shared vocabulary.
CROSS_TOKENIZER_TERMS = frozenset({"uld"})


def cross_tokenizer(objective: losses.Objective) -> bool:
  """Whether ``objective`` has a cross-tokenizer term (e.g. ``uld``)."""
  cross = {losses.LOSS_TERMS[name] for name in CROSS_TOKENIZER_TERMS}
  return any(t.term in cross for t in objective.terms)


def check_tokenizers(cfg, objective: losses.Objective, teacher_config: models.ModelConfig,
                     student_config: models.ModelConfig) -> None:
  """At the start of a run: teacher and student must share a vocabulary and tokenizer unless a
  cross-tokenizer term is configured.

  Students made from the teacher (``layers``, ``random``) share its tokenizer; a Hugging Face
  student directory with tokenizer files is compared with the teacher's tokenizer
  (:func:`jkd.data.check_same_tokenizer`).

  Raises:
    ValueError: the vocabularies or tokenizers differ and no cross-tokenizer term is set.
  """
  cross = cross_tokenizer(objective)
  if student_config.vocab_size != teacher_config.vocab_size and not cross:
    raise ValueError(f"teacher vocab {teacher_config.vocab_size} != student vocab"
                     f" {student_config.vocab_size}: token-level distillation needs one"
                     " vocabulary. Use the teacher's tokenizer for the student, or a"
                     " cross-tokenizer objective such as `uld` with data from"
                     " jkd.data.cross_tokenize.")
  source, path = student_source(cfg)
  if source is not STUDENT_SOURCES["hf"] or not any(
      os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
    return
  try:
    teacher_tok = tokenizer_for(cfg)
  except ValueError:  # A random teacher has no tokenizer to compare.
    return
  tokenizers.check_same_tokenizer(teacher_tok, models.load_tokenizer(path),
                                  cross_tokenizer_objective=cross)
