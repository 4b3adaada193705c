"""A run as users start it: data preparation, training, and the report.

``python -m jkd.train`` calls :func:`run`, which adds to :func:`jkd.train.train`:

* a data source prepared in the workdir with the teacher (``prepare`` in
  :data:`jkd.train.sources.DATA_SOURCES`): ``data.source = "teacher_corpus"``, the teacher's
  answers to ``corpus.prompts`` (:mod:`jkd.train.sources.corpus`), with held-out prompts as the
  evaluation set and their human-written text as the golden reference of the teacher-hacking
  monitor;
* ``report.enabled``: before training, greedy samples of the teacher and of the initial student
  on held-out prompts; after training, the trained student's samples and
  :func:`jkd.train.report.write_report` (``report.md``, ``report.json``, ``curves.png``).
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from jkd import sampling
from jkd import students
from jkd.data import corpus as corpus_lib
from jkd.train import build
from jkd.train import config
from jkd.train import distributed
from jkd.train import loop
from jkd.train import report as report_lib
from jkd.train import setup as setup_lib
from jkd.train import sharding
from jkd.train import sources
from jkd.train import stopping
from jkd.train import storage


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class _Models:
  """The teacher (and tokenizer) for the stages around training, built once on the mesh."""

  def __init__(self, cfg):
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    self.spec = build.teacher_spec(cfg)
    self.teacher = build.build_teacher(self.spec, mesh, sharding.DEFAULT_RULES,
                                       jax.random.fold_in(jax.random.key(int(cfg.seed)), 0))
    self.tokenizer = build.tokenizer_for(cfg)
    self.student_config = build.student_config(cfg, self.spec.config)
    self.mesh = mesh


def _greedy(params, config, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
  ids = [corpus_lib.encode_prompt(tokenizer, p) for p in prompts]
  stops = corpus_lib.default_stop_ids(tokenizer)
  out = sampling.generate(params, ids, config=config, key=None, greedy=True,
                          max_new_tokens=max_new_tokens, stop_ids=stops)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
          for i in range(len(prompts))]


def _shape(config, teacher=None) -> str:
  """``"24 layers, MLP 960, 61.1 M non-embedding parameters (58% of the teacher's)"``."""
  n = students.count_params(config)["non_embedding"]
  text = f"{config.num_layers} layers, MLP {config.intermediate_size}, {n / 1e6:.1f} M"
  if teacher is not None:
    text += f" non-embedding parameters ({n / students.count_params(teacher)['non_embedding']:.0%}"
    return text + " of the teacher's)"
  return text + " non-embedding parameters"


def run(cfg, workdir: str, *, allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
  """Prepares the data, trains (or resumes) and reports; see the module docstring.

  The config, the models and a resumed checkpoint's config are checked before anything is
  written to ``workdir``. A SIGTERM while the corpus is written (or before the first step)
  returns ``status="preempted"`` with what was done kept (:mod:`jkd.train.stopping`).
  ``allow_config_change``: see :func:`jkd.train.train`.
  """
  distributed.initialize_distributed(cfg)
  workdir = storage.resolve(workdir)
  with stopping.sigterm_noted():
    try:
      return _run(cfg, workdir, allow_config_change)
    except stopping.Stopped as e:
      _say(f"{e}: stopping; what was done is kept, and the same command goes on from it")
      resumed = loop.check_resume(cfg, workdir, allow_config_change)
      return {"step": resumed[0] if resumed else 0, "status": "preempted", "eval": None,
              "state": None}


def _run(cfg, workdir: str, allow_config_change: Sequence[str]) -> dict[str, Any]:
  setup_lib.check_config(cfg)
  loop.check_resume(cfg, workdir, allow_config_change)  # Reads only.
  prepare = sources.data_source(cfg).prepare
  if prepare is not None and storage.is_remote(workdir):
    raise ValueError(
        f"data.source={cfg.data.source} writes its data into the workdir, which must then be a"
        f" local or mounted path, not {workdir}: run it with a local workdir, or write the data"
        " first (e.g. python -m jkd.data.corpus) and train on it with data.source=tfds.")
  models = _Models(cfg) if prepare is not None or bool(cfg.report.enabled) else None
  if models is not None:  # (Without: train() checks everything before writing.)
    run = setup_lib.setup(cfg, teacher_config=models.teacher.config)
    setup_lib.check_seq_len(cfg, run.teacher_spec.config, run.student_config,
                            *(s.config for s in run.teacher_specs[1:]))
  kwargs, facts, timings, held = {}, {}, {}, []
  if prepare is not None:
    stopping.check()
    prepared = prepare(cfg, workdir, models.teacher, models.tokenizer)
    kwargs = {"train_source": prepared.train, "eval_source": prepared.eval,
              "golden_source": prepared.golden}
    held, facts = prepared.held_out, prepared.facts
    timings["corpus_s"] = prepared.seconds
  samples = []
  r = cfg.report
  if r.enabled:
    if not held:
      every = cfg.get("corpus", config.OPTIONAL_SECTIONS["corpus"])["holdout_every"]
      held = sources.corpus.split_prompts(corpus_lib.read_prompts(corpus_lib.SHIPPED_PROMPTS),
                                          int(every))[1]
    shown = [h["prompt"] for h in held[:int(r.samples)]]
    calibration = (functools.partial(build.peek_batches, kwargs["train_source"])
                   if "train_source" in kwargs else None)
    student0 = build.student_params(
        cfg, models.student_config, models.teacher,
        build.param_shardings(models.student_config, models.mesh, sharding.DEFAULT_RULES),
        jax.random.fold_in(jax.random.key(int(cfg.seed)), setup_lib.STUDENT_KEY), calibration)
    teacher_text = _greedy(models.teacher.params, models.teacher.config, models.tokenizer, shown,
                           int(r.sample_tokens))
    before_text = _greedy(student0, models.student_config, models.tokenizer, shown,
                          int(r.sample_tokens))
    kwargs["student_params"] = student0  # A fresh run starts from it (made once).
  t0 = time.perf_counter()
  if models is not None:
    kwargs["teacher"] = models.teacher  # Read once, for the corpus, the samples and training.
  result = loop.train(cfg, workdir, allow_config_change=allow_config_change, **kwargs)
  timings["train_s"] = time.perf_counter() - t0
  if r.enabled and result["status"] == "done" and jax.process_index() == 0:
    after_text = _greedy(result["state"].params, models.student_config, models.tokenizer,
                         shown, int(r.sample_tokens))
    samples = [{"prompt": p, "teacher": t, "student before": b, "student after": a}
               for p, t, b, a in zip(shown, teacher_text, before_text, after_text)]
    s, t = models.student_config, models.teacher.config
    summary = {
        "models": {"teacher": f"{cfg.teacher.source} ({_shape(t)})",
                   "student": f"{cfg.student.source} ({_shape(s, t)})",
                   "steps": int(cfg.train.steps)},
        "data": facts, "samples": samples, "timings": timings}
    paths = report_lib.write_report(workdir, summary, title=r.title)
    _say(f"report: {paths['md']}")
    result["report"] = paths
  return result
