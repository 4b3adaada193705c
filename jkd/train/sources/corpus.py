"""The main job's data source: a corpus the teacher writes in the run's workdir
(``data.source = "teacher_corpus"``).

The teacher answers the prompts of ``corpus.prompts`` (the shipped instruction set by default)
and the student trains on those completions. Prompts whose id number is a multiple of
``corpus.holdout_every`` are held out: their teacher completions are the evaluation set, and
their human-written text is the *golden* reference of the teacher-hacking monitor. The corpora
live in ``<workdir>/data``; a killed run resumes the generation where it stopped, and a finished
corpus is reused. :func:`jkd.train.stages.run` calls :func:`prepare_corpus` before training.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NamedTuple

import jax

from jkd.data import corpus as corpus_lib
from jkd.data import pipeline
from jkd.data import store
from jkd.train import config
from jkd.train import stopping


class Prepared(NamedTuple):
  """What a prepared data source gives the run.

  Attributes:
    train, eval, golden: batch sources (golden: the held-out prompts' own text).
    held_out: the held-out prompt records (the report samples them).
    seconds: time spent writing the corpora.
    facts: ``{name: value}`` for the report.
  """
  train: Any
  eval: Any
  golden: Any
  held_out: list[dict]
  seconds: float
  facts: dict[str, Any]


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


def _corpus(cfg, teacher, tokenizer, records: list[dict], out_dir: str, name: str) -> str:
  c = config.section(cfg, "corpus", needed_by="data.source='teacher_corpus'")
  final = os.path.join(out_dir, name, "1.0.0")
  if os.path.exists(os.path.join(final, "dataset_info.json")) and not os.path.isdir(
      os.path.join(out_dir, f"{name}.partial")):
    meta = store.read_metadata(final)
    if meta.get("count") != len(records) or meta.get("seed") != int(c.seed):
      raise ValueError(f"{final} holds a corpus of {meta.get('count')} prompts (seed"
                       f" {meta.get('seed')}), not the configured {len(records)} (seed {c.seed});"
                       " use a new workdir or delete that corpus.")
    return final
  path = corpus_lib.generate_corpus(
      records, out_dir, params=teacher.params, config=teacher.config, tokenizer=tokenizer,
      max_new_tokens=int(c.max_new_tokens), batch_size=int(c.batch_size),
      temperature=float(c.temperature), top_p=float(c.top_p), seed=int(c.seed), name=name,
      teacher=cfg.teacher.source, should_stop=stopping.requested)
  if path is None:  # SIGTERM: the batches written are kept in <name>.partial for the rerun.
    raise stopping.Stopped(f"SIGTERM while the teacher wrote {name}")
  return path


def _golden(records: list[dict], out_dir: str) -> str:
  """The held-out prompts' own (human-written) text as a ``text`` dataset."""
  path = os.path.join(out_dir, "golden", "1.0.0")
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  return store.write_dataset(out_dir, "golden", {"text": store.text_feature()},
                             {"train": ({"text": r["prompt"]} for r in records)},
                             metadata={"shape": "text", "count": len(records),
                                       "description": "held-out human-written prompts"})


def prepare_corpus(cfg, workdir: str, teacher, tokenizer) -> Prepared:
  """The teacher-written train and eval corpora and the golden text, as batch sources.

  Args:
    cfg: the run's config (``corpus`` and ``data`` sections).
    workdir: the run's directory; the corpora are written to ``workdir/data``.
    teacher: the built teacher (:class:`jkd.train.build.Teacher`).
    tokenizer: the teacher's tokenizer.
  """
  if jax.process_count() > 1:
    raise ValueError("data.source=teacher_corpus generates its corpus in a single process;"
                     " for a multi-process run write it first with `python -m jkd.data.corpus`"
                     " and train with data.source=tfds on it.")
  c, d = config.section(cfg, "corpus", needed_by="data.source='teacher_corpus'"), cfg.data
  prompts = c.prompts or corpus_lib.SHIPPED_PROMPTS
  records = corpus_lib.read_prompts(os.path.expanduser(prompts))
  train_records, held = split_prompts(records, int(c.holdout_every))
  if int(c.limit) > 0:
    train_records = train_records[:int(c.limit)]
    held = held[:max(1, int(c.limit) // 4)]
  if not held:
    raise ValueError("no prompt is held out for evaluation: lower corpus.holdout_every.")
  out_dir = os.path.join(workdir, "data")
  t0 = time.perf_counter()
  _say(f"teacher-written corpus: {len(train_records)} train + {len(held)} held-out prompts")
  train_path = _corpus(cfg, teacher, tokenizer, train_records, out_dir, "corpus_train")
  eval_path = _corpus(cfg, teacher, tokenizer, held, out_dir, "corpus_eval")
  golden_path = _golden(held, out_dir)
  seconds = time.perf_counter() - t0
  vocab = teacher.config.vocab_size
  common = dict(tokenizer=tokenizer, seq_len=int(d.seq_len), vocab_size=vocab,
                chat_template=bool(d.chat_template), overflow=d.overflow)
  eval_batch = min(int(d.batch_size), len(held))
  return Prepared(
      train=pipeline.text_pipeline(train_path, "train", batch_size=int(d.batch_size),
                                   pack=bool(d.pack), seed=int(d.seed), **common),
      eval=pipeline.text_pipeline(eval_path, "train", batch_size=eval_batch, shuffle=False,
                                  **common),
      golden=pipeline.text_pipeline(golden_path, "train", batch_size=eval_batch,
                                    shuffle=False, **common),
      held_out=held, seconds=seconds,
      facts={"train prompts": len(train_records), "held-out prompts": len(held),
             "corpus dir": out_dir})
