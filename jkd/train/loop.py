"""The training engine: ``train(config, workdir)`` around the one jitted step of jkd.train.step.

From a config (:func:`jkd.train.config.default_config`) it builds the mesh, the frozen sharded
teacher, the student's train state (restored from the newest checkpoint in ``workdir``, or
created already sharded), the batch sources, and runs the step with the state donated and the
teacher passed separately. Per step: metrics (``metrics.jsonl``, TensorBoard, a tqdm bar with
loss, tokens/s and ETA, on process 0), MFU from :func:`jkd.train.step_flops`; periodically an
evaluation and an asynchronous checkpoint. SIGTERM saves and returns; ``train.max_nan_steps``
non-finite steps in a row stop the run with :class:`NonFiniteError`, leaving the last good
checkpoint in place.

Multi-process runs call ``jax.distributed.initialize`` from ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (see :func:`initialize_distributed`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from jkd import losses
from jkd.data.source import as_batch_source
from jkd.train import build
from jkd.train import checkpoint as ckpt_lib
from jkd.train import evaluate as eval_lib
from jkd.train import monitor as monitor_lib
from jkd.train import sharding
from jkd.train import sources
from jkd.train.step import batch_work, check_teacher_free, make_optimizer, make_train_step
from jkd.train.writer import MetricsWriter, read_metrics

class NonFiniteError(RuntimeError):
  """Too many non-finite (skipped) steps in a row; the run stopped without saving."""


def _say(message: str) -> None:
  """A status line on process 0 (stderr, next to the progress bar)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Multi-process start.

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


class _Preemption:
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
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------

def _check_config(cfg) -> None:
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
  if cfg.data.batch_size % int(cfg.train.grad_accum):
    raise ValueError(f"data.batch_size {cfg.data.batch_size} is not divisible by"
                     f" train.grad_accum {cfg.train.grad_accum}.")


class _Monitor:
  """Host side of each step: fetches its metrics one step late (so the device keeps working),
  counts non-finite steps, writes metrics and moves the progress bar."""

  def __init__(self, cfg, writer: MetricsWriter, bar, *, streak: int, peak_flops: float):
    self.writer, self.bar = writer, bar
    self.log_every, self.total = int(cfg.train.log_every), int(cfg.train.steps)
    self.max_nan = int(cfg.train.max_nan_steps)
    self.streak, self.peak = streak, peak_flops
    self.tokens, self.flops = 0, 0.0
    self.pending: tuple[int, dict] | None = None
    self._last_time: float | None = None
    self.first_bad: int | None = None

  def set_work(self, tokens: int, flops: float) -> None:
    """Tokens and model FLOPs of one step (for ``perf/tokens_per_s`` and ``perf/mfu``)."""
    self.tokens, self.flops = tokens, flops

  def restart_clock(self) -> None:
    """Leaves the time of an evaluation or a checkpoint out of the next step's perf metrics."""
    self._last_time = time.perf_counter()

  def push(self, step: int, metrics: dict) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if self._last_time is not None:  # The first step of a process includes compilation.
      dt = now - self._last_time
      host.update({"perf/step_time_s": dt, "perf/tokens_per_s": self.tokens / dt,
                   "perf/mfu": self.flops / dt / self.peak if self.peak > 0 else 0.0})
    self._last_time = now
    finite = host.get("train/finite", 1.0) == 1.0
    self.streak = 0 if finite else self.streak + 1
    if finite:
      self.first_bad = None
    elif self.first_bad is None:
      self.first_bad = step
    if step % self.log_every == 0 or step == self.total or not finite:
      self.writer.write(step, host)
    self.bar.update(1)
    postfix = {"loss": f"{host['loss/total']:.4g}"}
    if "perf/tokens_per_s" in host:
      postfix["tok/s"] = f"{host['perf/tokens_per_s']:.3g}"
    self.bar.set_postfix(postfix, refresh=False)

  def too_many_nans(self) -> bool:
    return self.streak >= self.max_nan


class _Batches:
  """Per-process numpy batches -> global arrays sharded over the ``batch`` rule's mesh axes."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def shardings(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.sharding.Sharding]:
    """Shardings for batches like ``batch`` (checked: each process holds its own rows)."""
    out = {k: sharding.batch_sharding(self.mesh, self.rules, ndim=np.ndim(v))
           for k, v in batch.items()}
    name = next((k for k in ("tokens", "chosen_tokens") if k in batch), next(iter(batch)))
    rows, *rest = np.shape(batch[name])
    total = rows * jax.process_count()
    slices = {index[0].indices(total)[:2] for index in
              out[name].addressable_devices_indices_map((total, *rest)).values()}
    if sum(hi - lo for lo, hi in slices) != rows:
      raise ValueError(f"the mesh {dict(self.mesh.shape)} does not split the batch across the"
                       f" {jax.process_count()} processes (each serves {rows} of {total} rows):"
                       " put the processes on the data or fsdp axis.")
    return out

  def place(self, batch: Mapping[str, np.ndarray], shardings: Mapping) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}


class _Evaluator:
  """The jitted eval step over ``source.one_epoch()`` (at most ``max_batches``; 0: all)."""

  def __init__(self, source, batches: _Batches, *, student_config, teacher, params_shardings,
               replicated, max_batches: int, prefix: str = "eval/"):
    self.source, self.batches, self.max_batches = source, batches, max_batches
    self.prefix = prefix
    self.teacher = teacher  # With teacher.online=False its params are None: student metrics.
    self._step = eval_lib.make_eval_step(
        student_config=student_config,
        teacher_config=teacher.config if teacher.params is not None else None)
    self._shardings = (params_shardings, replicated)
    self._compiled = None

  def __call__(self, params) -> dict[str, float] | None:
    if self.source is None:
      return None
    local = self.source.one_epoch()
    if self.max_batches > 0:
      local = itertools.islice(local, self.max_batches)
    first = next(local, None)
    if first is None:
      raise ValueError("the eval set is smaller than one batch.")
    shardings = self.batches.shardings(first)
    if self._compiled is None:
      params_shardings, replicated = self._shardings
      self._compiled = jax.jit(self._step, out_shardings=replicated, in_shardings=(
          params_shardings, self.teacher.shardings, shardings))
    placed = (self.batches.place(b, shardings) for b in itertools.chain([first], local))
    metrics = eval_lib.evaluate_batches(self._compiled, params, self.teacher.params, placed)
    return {self.prefix + k.split("/", 1)[1]: v for k, v in metrics.items()}


class _HackingMonitor:
  """After each evaluation: the teacher-hacking verdict (:mod:`jkd.train.monitor`) over the
  run's evaluations so far (read back from ``metrics.jsonl``, so a resumed run continues it),
  logged as ``monitor/flagged``, ``monitor/off_fit``, ``monitor/diverging`` (0/1), with a
  warning line when it first flags."""

  def __init__(self, workdir: str, writer: MetricsWriter, *, enabled: bool):
    self.enabled, self.writer = enabled, writer
    self.history = read_metrics(workdir) if enabled else []
    self.flagged = False

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self.history.append({"step": step, **metrics})
    verdict = monitor_lib.assess_history(self.history)
    if verdict is None or verdict.fit is None:
      return
    self.writer.write(step, {"monitor/flagged": float(verdict.flagged),
                             "monitor/off_fit": float(verdict.off_fit),
                             "monitor/diverging": float(verdict.diverging)})
    if verdict.flagged and not self.flagged:
      signs = [text for on, text in ((verdict.off_fit, "left its power-law fit"),
                                     (verdict.diverging, "improves while the golden NLL worsens"))
               if on]
      _say(f"step {step}: possible teacher hacking since step {verdict.first_step}: the"
           f" student-teacher KL {' and '.join(signs)} (jkd.train.monitor).")
    self.flagged = verdict.flagged


def train(config, workdir: str, *, train_source=None, eval_source=None,
          golden_source=None, teacher: build.Teacher | None = None) -> dict[str, Any]:
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
    teacher: the config's teacher already built on this mesh (``build.build_teacher`` of
      ``build.teacher_spec(config)``, as :mod:`jkd.train.stages` has it), so that its weights
      are not read again; None: built here when needed.
    golden_source: like ``eval_source``, a golden reference (e.g. held-out human-written text)
      evaluated with it; its metrics are named ``golden/*`` (the teacher-hacking monitor's
      golden metric is ``golden/student_nll``, :mod:`jkd.train.monitor`).
    eval_source: an object whose ``one_epoch()`` yields eval batches (or None: no evaluation
      unless the config's data provides it).

  Returns:
    ``{"step": last step, "status": "done" | "preempted", "eval": last eval metrics or None}``.

  Raises:
    ValueError: a bad config, or a checkpoint of another model shape.
    jkd.train.checkpoint.CheckpointError: an unreadable checkpoint (left untouched).
    NonFiniteError: ``train.max_nan_steps`` non-finite steps in a row.
  """
  cfg = config
  initialize_distributed(cfg)
  _check_config(cfg)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2) + "\n")

  # Shapes first (cheap): the student's state, and a resumed run's checkpoint checked against
  # it before any teacher weights are read.
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  rules = sharding.DEFAULT_RULES
  key = jax.random.key(int(cfg.seed))
  teacher_spec = (build.TeacherSpec(teacher.config, None) if teacher is not None
                  else build.teacher_spec(cfg))  # (a GGUF spec reads the file)
  student_cfg = build.student_config(cfg, teacher_spec.config)
  objective = losses.build_objective(cfg.objective)
  build.check_tokenizers(cfg, objective, teacher_spec.config, student_cfg)
  total = int(cfg.train.steps)
  optimizer, schedule = make_optimizer(cfg.optimizer.to_dict(), total)
  online = bool(cfg.teacher.online)
  terms_key = jax.random.fold_in(key, 3)
  make_term_params = lambda: build.term_params(  # noqa: E731
      objective, terms_key, student_cfg, teacher_spec.config if online else None)
  abstract_state, state_sh = build.state_shardings(student_cfg, optimizer, objective, mesh,
                                                   rules, jax.eval_shape(make_term_params))
  if train_source is None:
    train_source, config_eval = sources.make_sources(cfg, teacher_spec.config.vocab_size)
    train_source = sources.miniplm.select_source(cfg, train_source)  # data.select
    eval_source = eval_source if eval_source is not None else config_eval
  train_source = as_batch_source(train_source)
  if "onpolicy" in cfg:
    train_source = sources.onpolicy.wrap_source(cfg, train_source, student_cfg)

  with contextlib.ExitStack() as cleanup:
    ck = cfg.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(ck.keep), best_metric=ck.best_metric,
        best_mode=ck.best_mode, async_save=bool(ck.async_save), config={
            "config": json.loads(cfg.to_json_best_effort()),
            "student_model": build.model_record(student_cfg),
            "teacher_model": build.model_record(teacher_spec.config)})
    cleanup.callback(checkpointer.close)
    cleanup.callback(checkpointer.wait)  # Runs first: a pending save completes.
    restored = checkpointer.restore(abstract_state)
    built, teacher = teacher, None  # teacher.online=False: only a `layers` student's init.
    if online or (restored is None and _student_needs_teacher(cfg)):
      teacher = built if built is not None else build.build_teacher(
          teacher_spec, mesh, rules, jax.random.fold_in(key, 0))
    if teacher is not None:  # Sources that score with the teacher (rounds, MiniPLM, DDK).
      train_source.bind_models(teacher_params=teacher.params, teacher_config=teacher.config,
                               student_config=student_cfg)
    if restored is not None:
      start, state, data_state, _ = restored
      train_source.set_state(data_state)
      _say(f"resuming from {checkpointer.step_path(start)}")
    else:
      start = 0
      state = build.create_state(
          build.student_params(cfg, student_cfg, teacher, state_sh.params,
                               jax.random.fold_in(key, 1)), optimizer, objective, state_sh,
          make_term_params())
    if online:
      teacher = build.freeze_teacher(teacher, cfg.teacher.param_dtype)
    else:  # Dropped: the step receives None and reads a sparse teacher from the batch.
      teacher = build.Teacher(teacher_spec.config, None, None)
    step_teacher_config = teacher.config if online else None

    step_fn = make_train_step(student_config=student_cfg, teacher_config=step_teacher_config,
                              objective=objective, optimizer=optimizer, schedule=schedule,
                              grad_accum=int(cfg.train.grad_accum))

    def step_with_key(state, batch, step_key, teacher_params):
      return step_fn(state, batch, jax.random.fold_in(step_key, state.step), teacher_params)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_key = jax.jit(lambda: jax.random.fold_in(key, 2), out_shardings=replicated)()
    batches = _Batches(mesh, rules)
    evaluator = _Evaluator(eval_source, batches, student_config=student_cfg, teacher=teacher,
                           params_shardings=state_sh.params, replicated=replicated,
                           max_batches=int(cfg.eval.batches))
    golden = _Evaluator(golden_source, batches, student_config=student_cfg, teacher=teacher,
                        params_shardings=state_sh.params, replicated=replicated,
                        max_batches=int(cfg.eval.batches), prefix="golden/")

    def evaluate(params) -> dict[str, float] | None:
      metrics = evaluator(params)
      golden_metrics = golden(params)
      if golden_metrics is not None:
        metrics = {**(metrics or {}), **golden_metrics}
      return metrics

    writer = MetricsWriter(workdir, start_step=start, enabled=primary)
    cleanup.callback(writer.close)
    from tqdm import tqdm  # noqa: PLC0415
    bar = cleanup.enter_context(tqdm(total=total, initial=start, unit="step",
                                     dynamic_ncols=True,
                                     disable=not (primary and cfg.train.progress_bar)))
    monitor = _Monitor(cfg, writer, bar, streak=int(jax.device_get(state.nan_streak)),
                       peak_flops=float(cfg.train.peak_tflops_per_device) * 1e12
                       * jax.device_count())
    preemption = _Preemption()
    cleanup.callback(preemption.close)
    eval_every, ckpt_every = int(cfg.eval.every), int(cfg.checkpoint.every)
    status, last_eval, step, compiled = "done", None, start, None
    hacking = _HackingMonitor(workdir, writer, enabled=primary)
    if start == 0 and restored is None and cfg.eval.get("at_start", False):
      initial = evaluate(state.params)  # The initial student, logged at step 0.
      if initial is not None:
        writer.write(0, initial)
      monitor.restart_clock()

    def save(step: int, metrics: Mapping[str, float] | None) -> None:
      if monitor.streak:
        _say(f"step {step}: no checkpoint during {monitor.streak} non-finite steps")
        return
      checkpointer.save(step, state, train_source.get_state(), metrics=metrics)

    while step < total:
      if preemption(step):
        status = "preempted"
        break
      train_source.before_batch(state.params)  # On-policy sources sample from the student.
      batch = next(train_source)
      if compiled is None:  # On the first batch: its arrays decide the shardings.
        if not online:
          check_teacher_free(objective, state.params, batch, student_config=student_cfg)
        batch_sh = batches.shardings(batch)
        compiled = jax.jit(step_with_key,
                           in_shardings=(state_sh, batch_sh, replicated, teacher.shardings),
                           out_shardings=(state_sh, replicated), donate_argnums=0)
        monitor.set_work(*batch_work({k: np.shape(v) for k, v in batch.items()}, student_cfg,
                                     step_teacher_config, objective, jax.process_count()))
      state, metrics = compiled(state, batches.place(batch, batch_sh), step_key,
                                teacher.params)
      step += 1
      monitor.push(step, metrics)
      do_eval = step == total or (eval_every > 0 and step % eval_every == 0)
      do_save = step == total or (ckpt_every > 0 and step % ckpt_every == 0)
      if do_eval or do_save or monitor.streak:
        monitor.flush()
      if monitor.too_many_nans():
        raise NonFiniteError(_nan_message(monitor, checkpointer, step))
      eval_metrics = None
      if do_eval:
        eval_metrics = last_eval = evaluate(state.params)
        if eval_metrics is not None:
          writer.write(step, eval_metrics)
          hacking.update(step, eval_metrics)
          train_source.after_eval(eval_metrics, state.params)  # DistiLLM's schedule, DDK.
      if do_save:
        save(step, eval_metrics)
      if do_eval or do_save:
        monitor.restart_clock()
    monitor.flush()
    if monitor.too_many_nans():
      raise NonFiniteError(_nan_message(monitor, checkpointer, step))
    if status == "preempted":
      _say(f"SIGTERM: saving step {step} and stopping")
      save(step, None)
  return {"step": step, "status": status, "eval": last_eval}


def _student_needs_teacher(cfg) -> bool:
  """Whether a fresh student is made from the teacher's parameters (``layers``)."""
  return cfg.student.source == "layers" and not cfg.student.init_from


def _nan_message(monitor: _Monitor, checkpointer: ckpt_lib.Checkpointer, step: int) -> str:
  checkpointer.wait()
  last = checkpointer.latest_step()
  where = (f"the last checkpoint, {checkpointer.step_path(last)}, is intact" if last is not None
           else "no checkpoint was saved")
  return (f"{monitor.streak} non-finite steps in a row (NaN/inf loss or gradient, steps"
          f" {monitor.first_bad}..{step}, all skipped): stopping (train.max_nan_steps ="
          f" {monitor.max_nan}). {where}. Lower optimizer.lr, check the data of those steps,"
          " or raise train.max_nan_steps; rerunning resumes from the last checkpoint.")
