"""The training engine: ``train(config, workdir)`` runs what :func:`jkd.train.setup.setup` builds.

:func:`train` makes the run's pieces (:func:`~jkd.train.setup.setup`), its batch sources
(:mod:`jkd.train.sources`), the frozen sharded teacher and the student's train state (restored
from the newest checkpoint in ``workdir``, or created already sharded), then runs the one jitted
step with the state donated and the teacher passed separately. Per step: metrics
(``metrics.jsonl``, TensorBoard, a tqdm bar with loss, tokens/s and ETA, on process 0:
:class:`jkd.train.progress.StepMonitor`); periodically an evaluation
(:class:`jkd.train.evaluate.Evaluator`, the teacher-hacking watch of
:mod:`jkd.train.monitor`) and an asynchronous checkpoint. The batch source's hooks
(:class:`jkd.data.BatchSource`) are called before each batch and after each evaluation.
SIGTERM saves and returns; ``train.max_nan_steps`` non-finite steps in a row stop the run with
:class:`NonFiniteError`, leaving the last good checkpoint in place.

Multi-process runs: :mod:`jkd.train.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jkd.data.source import as_batch_source
from jkd.train import build
from jkd.train import checkpoint as ckpt_lib
from jkd.train import evaluate as eval_lib
from jkd.train import monitor as monitor_lib
from jkd.train import resume as resume_lib
from jkd.train import setup as setup_lib
from jkd.train import sharding
from jkd.train import sources
from jkd.train import stopping
from jkd.train import storage
from jkd.train import teachers as teachers_lib
from jkd.train.distributed import Preemption, initialize_distributed
from jkd.errors import NonFiniteError
from jkd.train.progress import StepMonitor
from jkd.train.step import batch_work, check_teacher_free
from jkd.train.writer import MetricsWriter




def _say(message: str) -> None:
  """A status line on process 0 (stderr, next to the progress bar)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def check_resume(cfg, workdir: str, allow: Sequence[str] = ()) -> tuple[int, dict] | None:
  """Whether ``workdir``'s newest checkpoint may be resumed with ``cfg`` (reads only).

  Returns:
    ``(step, {key: (old, new)} of the accepted changes)``, or None without a checkpoint (or
    one saved before checkpoints stored their config).

  Raises:
    ConfigChangedError: ``cfg`` changes keys that are neither free nor in ``allow``
      (:mod:`jkd.train.resume`).
    CheckpointError: the checkpoint's config cannot be read.
    ValueError: an ``allow`` entry that is not a config key, or a workdir that is a file.
  """
  new = json.loads(cfg.to_json_best_effort())
  allow = resume_lib.check_allow(allow, new)
  workdir = storage.resolve(workdir)
  storage.check_workdir(workdir)  # A gs:// bucket exists and answers.
  if not storage.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"the workdir {workdir} is a file, not a directory: pass another --workdir.")
  directory = storage.join(workdir, "checkpoints")
  if not storage.isdir(directory):
    return None
  try:
    step_dir = ckpt_lib.find_checkpoint(directory)
  except FileNotFoundError:
    return None
  stored = ckpt_lib.read_config(step_dir).get("config")
  if stored is None:
    return None
  return int(step_dir.rstrip("/").rsplit("/", 1)[-1]), resume_lib.check_resume(stored, new, where=step_dir,
                                                                  allow=allow)


def _workdir(cfg, workdir: str, resumed: tuple[int, dict] | None, allow: Sequence[str]) -> str:
  """The absolute workdir, created, with ``config.json`` and the accepted config changes of a
  resume in ``config_history.jsonl`` (process 0); called once the run is accepted."""
  workdir = storage.resolve(workdir)
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.json"),
                       cfg.to_json_best_effort(indent=2) + "\n")
    if resumed is not None and resumed[1]:
      step, changes = resumed
      resume_lib.record(workdir, step, changes, allow)
      _say(f"resuming step {step} with config changes (recorded in"
           f" {resume_lib.HISTORY_FILE}): " + "; ".join(
               f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in changes.items()))
  return workdir


def _batch_sources(run: setup_lib.Run, train_source, eval_source):
  """``(train, eval)``: the config's data unless given; the train source as a BatchSource with
  ``data.select`` and ``onpolicy.mode`` applied."""
  cfg = run.config
  if train_source is None:
    train_source, config_eval = sources.make_sources(cfg, run.teacher_spec.config.vocab_size)
    train_source = sources.miniplm.select_source(cfg, train_source)  # data.select
    eval_source = eval_source if eval_source is not None else config_eval
  train_source = sources.onpolicy.wrap_source(cfg, as_batch_source(train_source),
                                              run.student_config)
  return train_source, eval_source


def _checkpointer(run: setup_lib.Run, workdir: str) -> ckpt_lib.Checkpointer:
  ck = run.config.checkpoint
  return ckpt_lib.Checkpointer(
      storage.join(workdir, "checkpoints"), keep=int(ck.keep), best_metric=ck.best_metric,
      best_mode=ck.best_mode, async_save=bool(ck.async_save), config={
          "config": json.loads(run.config.to_json_best_effort()),
          "student_model": build.model_record(run.student_config),
          "teacher_model": build.model_record(run.teacher_spec.config)})


def _student_needs_teacher(cfg) -> bool:
  """Whether a fresh student is made from the teacher's parameters (``layers``, ``prune``)."""
  return cfg.student.source in ("layers", "prune") and not cfg.student.init_from


def _all_teachers(run: setup_lib.Run, first: build.Teacher) -> build.Teacher:
  """Teacher 0 (``first``, frozen) and teachers ``1 .. N-1`` built and frozen in their own
  parameter dtypes, as one :class:`jkd.train.build.Teacher` of tuples."""
  out = [first]
  for i, (spec, dtype) in enumerate(zip(run.teacher_specs[1:], run.teacher_param_dtypes[1:]),
                                    start=1):
    out.append(build.freeze_teacher(build.build_teacher(spec, run.mesh, run.rules,
                                                        run.teacher_key(i)), dtype))
  return build.combine_teachers(out)


def _initial_state(run: setup_lib.Run, checkpointer, teacher, train_source, student_params):
  """``(state, start step, whether restored, step teacher)``: the newest checkpoint's state (its
  data position given to ``train_source``) or a fresh one; the teacher is built only when the
  step or a fresh ``layers`` student needs it, and frozen in ``teacher.param_dtype``. With
  several teachers the step teacher holds them all (teacher 0 alone is bound to the source and
  makes a ``layers`` student)."""
  cfg = run.config
  restored = checkpointer.restore(run.abstract_state)
  built, teacher = teacher, None  # teacher.online=False: only a `layers` student's init.
  if run.online or (restored is None and _student_needs_teacher(cfg)):
    teacher = built if built is not None else build.build_teacher(
        run.teacher_spec, run.mesh, run.rules,
        jax.random.fold_in(run.key, setup_lib.TEACHER_KEY))
  if teacher is not None:  # Sources that score with the teacher (rounds, MiniPLM, DDK).
    train_source.bind_models(teacher_params=teacher.params, teacher_config=teacher.config,
                             student_config=run.student_config)
  if restored is not None:
    start, state, data_state, _ = restored
    train_source.set_state(data_state)
    _say(f"resuming from {checkpointer.step_path(start)}")
  else:
    start = 0
    if student_params is not None:  # Made already (jkd.train.stages: the report's samples).
      params = jax.device_put(student_params, run.state_shardings.params)
    else:
      params = build.student_params(cfg, run.student_config, teacher,
                                    run.state_shardings.params,
                                    jax.random.fold_in(run.key, setup_lib.STUDENT_KEY),
                                    functools.partial(build.peek_batches, train_source))
    state = build.create_state(params, run.optimizer, run.objective, run.state_shardings,
                               run.term_params())
  if run.online:
    teacher = build.freeze_teacher(teacher, cfg.teacher.param_dtype)
    if run.routing is not None:
      teacher = _all_teachers(run, teacher)
  else:  # Dropped: the step receives None and reads a sparse teacher from the batch.
    teacher = build.Teacher(run.teacher_spec.config, None, None)
  return state, start, restored is not None, teacher


class _Training:
  """One call of :func:`train`: the loop over steps, evaluations and checkpoints."""

  def __init__(self, run: setup_lib.Run, workdir: str, cleanup: contextlib.ExitStack, *,
               train_source, eval_source, golden_source, teacher, checkpointer, start: int,
               restored: bool, first_batch: Mapping[str, np.ndarray] | None = None):
    cfg = run.config
    self.run, self.source, self.teacher = run, train_source, teacher
    self.checkpointer, self.total = checkpointer, int(cfg.train.steps)
    primary = jax.process_index() == 0
    # A fresh run drops every line of an earlier attempt that saved no checkpoint.
    self.writer = MetricsWriter(workdir, start_step=start if restored else -1, enabled=primary)
    cleanup.callback(self.writer.close)
    bar = cleanup.enter_context(tqdm(total=self.total, initial=start, unit="step",
                                     desc="train", dynamic_ncols=True,
                                     disable=not (primary and cfg.train.progress_bar)))
    self.monitor = StepMonitor(cfg, self.writer, bar, streak=0,
                               peak_flops=float(cfg.train.peak_tflops_per_device) * 1e12
                               * jax.device_count())
    self.preemption = Preemption()
    self.placer = sharding.BatchPlacer(run.mesh, run.rules)
    common = dict(student_config=run.student_config, teacher=teacher,
                  params_shardings=run.state_shardings.params, replicated=run.replicated,
                  max_batches=int(cfg.eval.batches), routing=run.routing)
    self.evaluators = [eval_lib.Evaluator(eval_source, self.placer, **common),
                       eval_lib.Evaluator(golden_source, self.placer, **common,
                                          prefix="golden/")]
    self.hacking = monitor_lib.HackingWatch(workdir, self.writer, enabled=primary)
    self.step_key = run.step_key()
    self.compiled = None
    self.first_batch = first_batch  # Fetched (and checked) before the workdir was written.

  def evaluate(self, params, term_params=None) -> dict[str, float] | None:
    """Eval and golden metrics of ``params`` (None without an eval source); ``term_params``
    holds the teachers' gate, if any."""
    metrics = None
    for evaluator in self.evaluators:
      found = evaluator(params, term_params)
      if found is not None:
        metrics = {**(metrics or {}), **found}
    return metrics

  def save(self, step: int, state, metrics: Mapping[str, float] | None) -> None:
    if self.monitor.streak:
      _say(f"step {step}: no checkpoint during {self.monitor.streak} non-finite steps")
      return
    self.checkpointer.save(step, state, self.source.get_state(), metrics=metrics)

  def compile(self, batch: Mapping[str, np.ndarray]) -> None:
    """Jits the step for the first batch's shapes (its arrays decide the batch shardings)."""
    run = self.run
    self.batch_shardings = self.placer.shardings(batch)
    self.compiled = run.jit_step(self.batch_shardings)
    self.monitor.set_work(*batch_work({k: np.shape(v) for k, v in batch.items()},
                                      run.student_config, run.step_teacher_config,
                                      run.objective, jax.process_count()))

  def step(self, state):
    """One training step on the source's next batch."""
    if self.first_batch is not None:
      batch, self.first_batch = self.first_batch, None
    else:
      self.source.before_batch(state.params)  # On-policy sources sample from the student.
      batch = next(self.source)
      teachers_lib.check_batch(batch, self.run.routing)
    if self.compiled is None:
      self.compile(batch)
    return self.compiled(state, self.placer.place(batch, self.batch_shardings), self.step_key,
                         self.teacher.params)

  def after_step(self, step: int, state, metrics) -> dict[str, float] | None:
    """Metrics, evaluation and checkpoint after step ``step``; the eval metrics, if any."""
    cfg, last = self.run.config, step == self.total
    self.monitor.push(step, metrics)
    do_eval = last or (int(cfg.eval.every) > 0 and step % int(cfg.eval.every) == 0)
    do_save = last or (int(cfg.checkpoint.every) > 0 and step % int(cfg.checkpoint.every) == 0)
    if do_eval or do_save or self.monitor.streak:
      self.monitor.flush()
    self.check_finite(step)
    eval_metrics = None
    if do_eval:
      eval_metrics = self.evaluate(state.params, state.term_params)
      if eval_metrics is not None:
        self.writer.write(step, eval_metrics)
        self.hacking.update(step, eval_metrics)
        self.source.after_eval(eval_metrics, state.params)  # DistiLLM's schedule, DDK.
    if do_save:
      self.save(step, state, eval_metrics)
    if do_eval or do_save:
      self.monitor.restart_clock()
    return eval_metrics

  def check_finite(self, step: int) -> None:
    if not self.monitor.too_many_nans():
      return
    self.checkpointer.wait()
    last = self.checkpointer.latest_step()
    where = (f"the last checkpoint, {self.checkpointer.step_path(last)}, is intact"
             if last is not None else "no checkpoint was saved")
    raise NonFiniteError(
        f"{self.monitor.streak} non-finite steps in a row ({self.monitor.what_overflowed()};"
        f" steps {self.monitor.first_bad}..{step}, all skipped): stopping (train.max_nan_steps ="
        f" {self.monitor.max_nan}). {where}. Lower optimizer.lr, check the data of those"
        " steps, or raise train.max_nan_steps; rerunning resumes from the last checkpoint.")

  def loop(self, state, start: int, restored: bool) -> dict[str, Any]:
    """Steps from ``start`` to ``train.steps``; the result dict of :func:`train`."""
    self.monitor.streak = int(jax.device_get(state.nan_streak))
    if start == 0 and not restored and self.run.config.eval.get("at_start", False):
      initial = self.evaluate(state.params, state.term_params)  # The initial student, step 0.
      if initial is not None:
        self.writer.write(0, initial)
      self.monitor.restart_clock()
    status, last_eval, step = "done", None, start
    while step < self.total:
      if self.preemption(step):
        status = "preempted"
        break
      state, metrics = self.step(state)
      step += 1
      last_eval = self.after_step(step, state, metrics) or last_eval
    self.monitor.flush()
    self.check_finite(step)
    if status == "preempted" and step > start:
      _say(f"SIGTERM: saving step {step} and stopping")
      self.save(step, state, None)
    elif status == "preempted":
      _say(f"SIGTERM before step {step + 1}: stopping (nothing new to save)")
    return {"step": step, "status": status, "eval": last_eval, "state": state}


def train(config, workdir: str, *, train_source=None, eval_source=None,
          golden_source=None, teacher: build.Teacher | None = None,
          allow_config_change: Sequence[str] = (),
          student_params: Any = None) -> dict[str, Any]:
  """Runs (or resumes) a training run in ``workdir``.

  Args:
    config: a ``ml_collections.ConfigDict`` with the keys of
      :func:`jkd.train.config.default_config`.
    workdir: the run's directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
      ``config.json``. A workdir with checkpoints resumes from the newest.
    train_source: replaces the config's data: an iterator of per-process ``{name: [b, T]}``
      numpy batches: a :class:`jkd.data.BatchSource` (e.g. an :class:`jkd.data.ArraySource`;
      preference batches work too), whose hooks the loop calls, or any iterator with
      ``get_state()``/``set_state()``. With ``onpolicy.mode`` set it is wrapped in the mode's
      source (:mod:`jkd.train.sources.onpolicy`).
    eval_source: an object whose ``one_epoch()`` yields eval batches (or None: no evaluation
      unless the config's data provides it).
    golden_source: like ``eval_source``, a golden reference (e.g. held-out human-written text)
      evaluated with it; its metrics are named ``golden/*`` (the teacher-hacking monitor's
      golden metric is ``golden/student_nll``, :mod:`jkd.train.monitor`).
    teacher: the config's teacher already built on this mesh (``build.build_teacher`` of
      ``build.teacher_spec(config)``, as :mod:`jkd.train.stages` has it), so that its weights
      are not read again; None: built here when needed.
    allow_config_change: config keys (or sections) that may differ from the checkpoint's on
      resume, beyond the free ones (:mod:`jkd.train.resume`).
    student_params: a fresh run's initial student, already made by
      ``build.student_params`` (e.g. a pruned student whose importance was measured for the
      report's samples); None: made here. Ignored when resuming.

  Returns:
    ``{"step": last step, "status": "done" | "preempted", "eval": last eval metrics or None,
    "state": the final TrainState}``.

  Raises (the classes of :mod:`jkd.errors`; nothing is written to ``workdir`` before
  the config, the data and the checkpoint's config are checked):
    ValueError: a bad config or data.
    ConfigChangedError: a resume with a config that computes something else.
    CheckpointMismatchError: a checkpoint of other shapes.
    CheckpointError: an unreadable checkpoint (left untouched).
    SaveError: a checkpoint that cannot be written (no space, read-only); the partial step is
      removed, earlier checkpoints are intact.
    NonFiniteError: ``train.max_nan_steps`` non-finite steps in a row.
  """
  initialize_distributed(config)
  with stopping.sigterm_noted():
    return _train(config, workdir, train_source=train_source, eval_source=eval_source,
                  golden_source=golden_source, teacher=teacher,
                  allow_config_change=allow_config_change, student_params=student_params)


def _train(config, workdir: str, *, train_source, eval_source, golden_source, teacher,
           allow_config_change: Sequence[str], student_params) -> dict[str, Any]:
  run = setup_lib.setup(config, teacher_config=None if teacher is None else teacher.config)
  resumed = check_resume(config, workdir, allow_config_change)
  if train_source is None:  # The config's data.
    setup_lib.check_seq_len(config, run.teacher_spec.config, run.student_config,
                            *(s.config for s in run.teacher_specs[1:]))
  train_source, eval_source = _batch_sources(run, train_source, eval_source)
  workdir = storage.resolve(workdir)
  with contextlib.ExitStack() as cleanup:
    checkpointer = _checkpointer(run, workdir)  # Creates nothing before the first save.
    cleanup.callback(checkpointer.close)
    cleanup.callback(checkpointer.wait)  # Runs first: a pending save completes.
    # The models' weights and a checkpoint's state and data position are read (and checked)
    # before anything is written to the workdir.
    state, start, restored, teacher = _initial_state(run, checkpointer, teacher, train_source,
                                                     student_params)
    first = None
    if start < int(config.train.steps):  # The first batch too: a bad example or shape shows.
      train_source.before_batch(state.params)
      first = next(train_source)
      if not run.online:
        check_teacher_free(run.objective, state.params, first,
                           student_config=run.student_config)
      teachers_lib.check_batch(first, run.routing)
    first_eval = (next(iter(eval_source.one_epoch()), None)
                  if eval_source is not None and run.routing is not None else None)
    if first_eval is not None:
      teachers_lib.check_batch(first_eval, run.routing, what="the eval data")
    _workdir(config, workdir, resumed, allow_config_change)
    training = _Training(run, workdir, cleanup, train_source=train_source,
                         eval_source=eval_source, golden_source=golden_source, teacher=teacher,
                         checkpointer=checkpointer, start=start, restored=restored,
                         first_batch=first)
    return training.loop(state, start, restored)
