"""A run as users start it: data preparation, training, and the report.

``python -m jkd.train`` calls :func:`run`, which adds to :func:`jkd.train.train`:

* ``data.source = "teacher_corpus"``: the teacher answers the prompts of ``corpus.prompts``
  (the shipped instruction set by default) and the student trains on those completions
  (sequence-level KD, plus the token-level objective with the teacher online). Prompts whose id
  number is a multiple of ``corpus.holdout_every`` are held out: their teacher completions are
  the evaluation set, and their human-written text is the *golden* reference of the
  teacher-hacking monitor. The corpora live in ``<workdir>/data``; a killed run resumes the
  generation where it stopped, and a finished corpus is reused.
* ``report.enabled``: before training, greedy samples of the teacher and of the initial student
  on held-out prompts; after training, the trained student's samples and
  :func:`jkd.train.report.write_report` (``report.md``, ``report.json``, ``curves.png``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from jkd import sampling
from jkd.train import build
from jkd.train import checkpoint as ckpt_lib
from jkd.train import loop
from jkd.train import report as report_lib
from jkd.train import sharding
from jkd.train.data import tokenizer_for

SHIPPED_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "prompts",
                               "instructions.jsonl")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def split_prompts(records: list[dict], holdout_every: int) -> tuple[list[dict], list[dict]]:
  """``(train, held out)``: a prompt is held out when the number in its id (``w010`` -> 10) is
  a multiple of ``holdout_every`` (records without a number in their id train).

  >>> split_prompts([{"id": "w009"}, {"id": "w010"}, {"id": "x"}], 10)
  ([{'id': 'w009'}, {'id': 'x'}], [{'id': 'w010'}])
  """
  if holdout_every < 2:
    raise ValueError(f"corpus.holdout_every must be >= 2 (got {holdout_every}).")
  train, held = [], []
  for r in records:
    digits = "".join(ch for ch in str(r.get("id", "")) if ch.isdigit())
    (held if digits and int(digits) % holdout_every == 0 else train).append(r)
  return train, held


class _Models:
  """The teacher (and tokenizer) for the stages around training, built once on the mesh."""

  def __init__(self, cfg):
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    self.spec = build.teacher_spec(cfg)
    self.teacher = build.build_teacher(self.spec, mesh, sharding.DEFAULT_RULES,
                                       jax.random.fold_in(jax.random.key(int(cfg.seed)), 0))
    self.tokenizer = tokenizer_for(cfg)
    self.student_config = build.student_config(cfg, self.spec.config)
    self.mesh = mesh


def _corpus(cfg, models: _Models, records: list[dict], out_dir: str, name: str) -> str:
  from jkd.data import corpus as corpus_lib  # noqa: PLC0415
  from jkd.data import store  # noqa: PLC0415
  c = cfg.corpus
  final = os.path.join(out_dir, name, "1.0.0")
  if os.path.exists(os.path.join(final, "dataset_info.json")) and not os.path.isdir(
      os.path.join(out_dir, f"{name}.partial")):
    meta = store.read_metadata(final)
    if meta.get("count") != len(records) or meta.get("seed") != int(c.seed):
      raise ValueError(f"{final} holds a corpus of {meta.get('count')} prompts (seed"
                       f" {meta.get('seed')}), not the configured {len(records)} (seed {c.seed});"
                       " use a new workdir or delete that corpus.")
    return final
  return corpus_lib.generate_corpus(
      records, out_dir, params=models.teacher.params, config=models.teacher.config,
      tokenizer=models.tokenizer, max_new_tokens=int(c.max_new_tokens),
      batch_size=int(c.batch_size), temperature=float(c.temperature), top_p=float(c.top_p),
      seed=int(c.seed), name=name, teacher=cfg.teacher.source)


def _golden(records: list[dict], out_dir: str) -> str:
  """The held-out prompts' own (human-written) text as a ``text`` dataset."""
  from jkd.data import store  # noqa: PLC0415
  path = os.path.join(out_dir, "golden", "1.0.0")
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  return store.write_dataset(out_dir, "golden", {"text": store.text_feature()},
                             {"train": ({"text": r["prompt"]} for r in records)},
                             metadata={"shape": "text", "count": len(records),
                                       "description": "held-out human-written prompts"})


def prepare_corpus(cfg, workdir: str, models: _Models) -> dict[str, Any]:
  """The teacher-written train and eval corpora and the golden text, as batch sources."""
  from jkd.data import corpus as corpus_lib  # noqa: PLC0415
  from jkd.data import pipeline  # noqa: PLC0415
  if jax.process_count() > 1:
    raise ValueError("data.source=teacher_corpus generates its corpus in a single process;"
                     " for a multi-process run write it first with `python -m jkd.data.corpus`"
                     " and train with data.source=tfds on it.")
  c, d = cfg.corpus, cfg.data
  records = corpus_lib.read_prompts(os.path.expanduser(c.prompts or SHIPPED_PROMPTS))
  train_records, held = split_prompts(records, int(c.holdout_every))
  if int(c.limit) > 0:
    train_records = train_records[:int(c.limit)]
    held = held[:max(1, int(c.limit) // 4)]
  if not held:
    raise ValueError("no prompt is held out for evaluation: lower corpus.holdout_every.")
  out_dir = os.path.join(workdir, "data")
  t0 = time.perf_counter()
  _say(f"teacher-written corpus: {len(train_records)} train + {len(held)} held-out prompts")
  train_path = _corpus(cfg, models, train_records, out_dir, "corpus_train")
  eval_path = _corpus(cfg, models, held, out_dir, "corpus_eval")
  golden_path = _golden(held, out_dir)
  seconds = time.perf_counter() - t0
  vocab = models.spec.config.vocab_size
  common = dict(tokenizer=models.tokenizer, seq_len=int(d.seq_len), vocab_size=vocab,
                chat_template=bool(d.chat_template), overflow=d.overflow)
  eval_batch = min(int(d.batch_size), len(held))
  return {
      "train": pipeline.text_pipeline(train_path, "train", batch_size=int(d.batch_size),
                                      pack=bool(d.pack), seed=int(d.seed), **common),
      "eval": pipeline.text_pipeline(eval_path, "train", batch_size=eval_batch, shuffle=False,
                                     **common),
      "golden": pipeline.text_pipeline(golden_path, "train", batch_size=eval_batch,
                                       shuffle=False, **common),
      "held_out": held, "seconds": seconds,
      "facts": {"train prompts": len(train_records), "held-out prompts": len(held),
                "corpus dir": out_dir},
  }


def _greedy(params, config, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
  from jkd.data import corpus as corpus_lib  # noqa: PLC0415
  ids = [corpus_lib.encode_prompt(tokenizer, p) for p in prompts]
  stops = corpus_lib.default_stop_ids(tokenizer)
  out = sampling.generate(params, ids, config=config, key=None, greedy=True,
                          max_new_tokens=max_new_tokens, stop_ids=stops)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  return [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
          for i in range(len(prompts))]


def run(cfg, workdir: str) -> dict[str, Any]:
  """Prepares the data, trains (or resumes) and reports; see the module docstring."""
  loop.initialize_distributed(cfg)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  needs_models = cfg.data.source == "teacher_corpus" or bool(cfg.report.enabled)
  models = _Models(cfg) if needs_models else None
  kwargs, facts, timings, held = {}, {}, {}, []
  if cfg.data.source == "teacher_corpus":
    prepared = prepare_corpus(cfg, workdir, models)
    kwargs = {"train_source": prepared["train"], "eval_source": prepared["eval"],
              "golden_source": prepared["golden"]}
    held, facts = prepared["held_out"], prepared["facts"]
    timings["corpus_s"] = prepared["seconds"]
  samples = []
  r = cfg.report
  if r.enabled:
    if not held:
      from jkd.data import corpus as corpus_lib  # noqa: PLC0415
      held = split_prompts(corpus_lib.read_prompts(SHIPPED_PROMPTS), 10)[1]
    shown = [h["prompt"] for h in held[:int(r.samples)]]
    student0 = build.student_params(
        cfg, models.student_config, models.teacher,
        build.param_shardings(models.student_config, models.mesh, sharding.DEFAULT_RULES),
        jax.random.fold_in(jax.random.key(int(cfg.seed)), 1))
    teacher_text = _greedy(models.teacher.params, models.teacher.config, models.tokenizer, shown,
                           int(r.sample_tokens))
    before_text = _greedy(student0, models.student_config, models.tokenizer, shown,
                          int(r.sample_tokens))
    del student0
  t0 = time.perf_counter()
  if models is not None:
    kwargs["teacher"] = models.teacher  # Read once, for the corpus, the samples and training.
  result = loop.train(cfg, workdir, **kwargs)
  timings["train_s"] = time.perf_counter() - t0
  if r.enabled and result["status"] == "done" and jax.process_index() == 0:
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        build.abstract_params(models.student_config)[0],
        build.param_shardings(models.student_config, models.mesh, sharding.DEFAULT_RULES))
    from absl import logging as absl_logging  # noqa: PLC0415
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax warns of metadata it does not need.
    try:
      trained = ckpt_lib.restore_params(workdir, abstract)
    finally:
      absl_logging.set_verbosity(level)
    after_text = _greedy(trained, models.student_config, models.tokenizer, shown,
                         int(r.sample_tokens))
    samples = [{"prompt": p, "teacher": t, "student before": b, "student after": a}
               for p, t, b, a in zip(shown, teacher_text, before_text, after_text)]
    s, t = models.student_config, models.teacher.config
    summary = {
        "models": {"teacher": f"{cfg.teacher.source} ({t.num_layers} layers)",
                   "student": f"{s.num_layers} layers", "steps": int(cfg.train.steps)},
        "data": facts, "samples": samples, "timings": timings}
    paths = report_lib.write_report(workdir, summary, title=r.title)
    _say(f"report: {paths['md']}")
    result["report"] = paths
  return result
