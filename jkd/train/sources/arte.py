"""ARTE in the engine: a teacher tuned to its student writes the corpus (``data.source =
"arte_corpus"``).

Before training, :func:`prepare_arte` runs ARTE (Liu et al., arXiv 2406.19227, 2024) in the
run's workdir, in five resumable stages:

1. **Drafts.** The teacher answers each of the first ``arte.prompts`` training prompts
   (``corpus.prompts``, split as :mod:`jkd.train.sources.corpus` does) ``arte.n`` times at
   ``arte.temperature``: ``data/arte_drafts`` (a teacher corpus of ids ``<id>#<j>``).
2. **Scores.** The initial student (the one training starts from) trains on each draft alone
   for ``arte.lookahead_steps`` SGD steps of ``arte.lookahead_lr``; the drop in its NLL on the
   validation set is the draft's score (:func:`jkd.data.arte.student_gains`). The best and the
   worst draft of each prompt make a pair (:func:`jkd.data.arte.rank_drafts`):
   ``arte/pairs-<digest>.npz`` and ``arte/drafts-<digest>.jsonl`` (every draft and its score).
3. **DPO.** A copy of the teacher (``student.source=layers``, ``every=1``) is trained with DPO
   (``beta = arte.beta``) on the pairs for ``arte.dpo_steps`` steps of ``arte.dpo_lr`` against
   the frozen teacher as the reference: an inner :func:`jkd.train.train` run in
   ``arte/dpo-<digest>/`` (resumed like any run; its ``metrics.jsonl`` holds ``dpo/rewards/*``).
4. **Corpus.** The tuned teacher answers every training prompt (``corpus.*`` sampling):
   ``data/arte_train``, the same ``prompt_completion`` dataset as ``teacher_corpus`` writes, and
   the student trains on it.
5. **Figures.** The mean score of the final corpus's examples under the same signal, with the
   stage figures (draft scores, pairs, the last DPO step's reward accuracy and margin, corpus
   size), go to stderr, ``arte/summary.json`` and the report's facts.

``arte.tune=False`` is the untuned baseline: stages 1-3 are skipped (they change nothing
without DPO) and the teacher itself writes ``data/arte_train``; the corpus is still scored.

Target data: ``arte.validation`` (the scoring set) and ``arte.eval`` (the run's eval set) are
JSONL files of ``text``, ``prompt_completion`` or ``chat`` lines from the distribution the
student should learn. Empty, they come from the held-out prompts: the first of every two is
validation (its human-written text), the others the eval set (the *untuned* teacher's answers,
so that tuned and untuned runs are evaluated alike) with their own text as the golden source.

Every file is reused on a rerun when its inputs are unchanged (the digest in its name, or the
teacher fingerprint in a corpus's metadata); a corpus of another teacher is an error rather
than reused. SIGTERM stops between corpus batches or DPO steps, keeping what was done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jkd.data import arte as arte_lib
from jkd.data import corpus as corpus_lib
from jkd.data import examples as examples_lib
from jkd.data import jsonl
from jkd.data import pipeline
from jkd.data import preference
from jkd.data import store
from jkd.data.arrays import ArraySource
from jkd.data.teacher_cache import teacher_fingerprint
from jkd.train import build
from jkd.train import config
from jkd.train import setup as setup_lib
from jkd.train import sharding
from jkd.train import stopping
from jkd.train.sources import corpus as corpus_source

_NEEDED_BY = "data.source='arte_corpus'"
_TARGET_SHAPES = ("text", "prompt_completion", "chat")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str((p.dtype.str, p.shape)).encode())
      h.update(np.ascontiguousarray(p).tobytes())
    else:
      h.update(json.dumps(p, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def _atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Options.

def check_options(cfg) -> None:
  """The ``arte`` section's values (a clear error names the key)."""
  a = config.section(cfg, "arte", needed_by=_NEEDED_BY)
  config.section(cfg, "corpus", needed_by=_NEEDED_BY)
  ints = (("n", 2, "drafts per prompt: ARTE ranks at least two"), ("prompts", 0, "0: all"),
          ("lookahead_steps", 1, ""), ("score_batch_size", 1, ""), ("dpo_steps", 1, ""),
          ("dpo_batch_size", 1, ""))
  for key, low, why in ints:
    value = a[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"arte.{key} must be an int >= {low}{f' ({why})' if why else ''};"
                       f" got {value!r}.")
  for key in ("lookahead_lr", "dpo_lr", "beta", "temperature"):
    value = float(a[key])
    if not np.isfinite(value) or value <= 0:
      raise ValueError(f"arte.{key} must be a positive number (got {a[key]!r}).")
  if not np.isfinite(float(a.min_gap)) or float(a.min_gap) < 0:
    raise ValueError(f"arte.min_gap must be >= 0 (got {a.min_gap!r}).")


# ---------------------------------------------------------------------------------------------
# Examples.

def read_target(path: str) -> tuple[list[dict[str, str]], str]:
  """``(records, shape)`` of a JSONL file of target examples (``text``, ``prompt_completion``
  or ``chat`` lines, validated as :mod:`jkd.data.jsonl` does).

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: an empty file, a bad line, or another shape (the message names the line).
  """
  path = os.path.expanduser(path)
  records, shape = [], None
  for lineno, line in jsonl.read_text_lines(path):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e.msg}); each line must be one JSON"
                       " object.") from None
    if shape is None:
      if not isinstance(record, dict):
        raise ValueError(f"{where}: a line must be a JSON object.")
      shape = jsonl.detect_shape(record.keys(), where)
      if shape not in _TARGET_SHAPES:
        raise ValueError(f"{where}: ARTE's target examples are {list(_TARGET_SHAPES)} lines,"
                         f" not {shape!r}.")
    records.append(jsonl.validate_line(record, shape, where))
  if not records:
    raise ValueError(f"{path} holds no target example: ARTE scores drafts by the student's"
                     " NLL on them, so give at least one line.")
  return records, shape


def tokenize_records(records: Sequence[Mapping[str, Any]], tokenizer, *, shape: str,
                     seq_len: int, chat_template: bool, vocab_size: int,
                     what: str) -> tuple[dict[str, np.ndarray], list[int]]:
  """``({"tokens", "labels", "loss_mask"}: [N, seq_len], kept indices)``: each record as the
  engine's pipeline tokenises it (:func:`jkd.data.tokenize_example`, cut to ``seq_len``),
  right-padded; a record that leaves no trained token (or has an empty completion) is dropped.

  Raises:
    ValueError: no record left (the message says ``what`` they were).
  """
  rows, kept = [], []
  for i, r in enumerate(records):
    try:
      ex = examples_lib.tokenize_example(r, tokenizer, shape=shape, seq_len=seq_len,
                                         chat_template=chat_template, overflow="truncate",
                                         vocab_size=vocab_size, name=f"{what} {i}")
    except ValueError:
      if shape == "prompt_completion" and not str(r.get("completion", "")).strip():
        continue  # An empty draft: nothing to learn from.
      raise
    if ex is not None:
      rows.append(examples_lib.pad_example(ex, seq_len))
      kept.append(i)
  if not rows:
    raise ValueError(f"no {what} left to score: every one is empty or has no trained token"
                     f" within data.seq_len={seq_len}.")
  return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask")}, kept


# ---------------------------------------------------------------------------------------------
# Corpora.

def write_corpus(cfg, params, teacher_config, tokenizer, records: list[dict], out_dir: str,
                 name: str, *, temperature: float | None = None) -> str:
  """A teacher corpus (:func:`jkd.data.generate_corpus`, ``corpus.*`` sampling) of ``params``
  in ``out_dir/name``; a finished one is reused only when written by the same parameters.

  Raises:
    ValueError: a finished corpus of another teacher, prompt count or seed there.
    jkd.train.stopping.Stopped: SIGTERM (the batches written are kept for the rerun).
  """
  c = cfg.corpus
  final = os.path.join(out_dir, name, "1.0.0")
  partial = os.path.join(out_dir, f"{name}.partial")
  if os.path.exists(os.path.join(final, "dataset_info.json")) and not os.path.isdir(partial):
    meta = store.read_metadata(final)
    want = teacher_fingerprint(params, teacher_config)
    if (meta.get("count") != len(records) or meta.get("seed") != int(c.seed)
        or meta.get("teacher_fingerprint") != want):
      raise ValueError(f"{final} holds a corpus of {meta.get('count')} prompts (seed"
                       f" {meta.get('seed')}) by another teacher than this run's"
                       f" ({len(records)} prompts, seed {c.seed}); use a new workdir or delete"
                       " that corpus.")
    return final
  path = corpus_lib.generate_corpus(
      records, out_dir, params=params, config=teacher_config, tokenizer=tokenizer,
      max_new_tokens=int(c.max_new_tokens), batch_size=int(c.batch_size),
      temperature=float(c.temperature if temperature is None else temperature),
      top_p=float(c.top_p), seed=int(c.seed), name=name, teacher=cfg.teacher.source,
      chat_template=bool(cfg.data.chat_template), progress=bool(cfg.train.progress_bar),
      should_stop=stopping.requested)
  if path is None:
    raise stopping.Stopped(f"SIGTERM while the teacher wrote {name}")
  return path


def _read_corpus(path: str) -> list[dict[str, str]]:
  split = store.open_split(path, "train")
  out = []
  for i in range(len(split)):
    row = split[i]
    out.append({k: (v.decode("utf-8") if isinstance(v, bytes) else str(v))
                for k, v in row.items()})
  return out


def _golden(records: list[dict], out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name, "1.0.0")
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  return store.write_dataset(out_dir, name, {"text": store.text_feature()},
                             {"train": ({"text": r["prompt"]} for r in records)},
                             metadata={"shape": "text", "count": len(records),
                                       "description": "held-out human-written prompts"})


# ---------------------------------------------------------------------------------------------
# DPO on the pairs.

def dpo_config(cfg, pairs_path: str, num_pairs: int):
  """The inner run that DPO-tunes a copy of the teacher on ARTE's pairs: ``cfg`` with the policy
  a copy of the teacher (``student.source=layers``, ``every=1``), the frozen teacher as the
  reference, objective ``dpo`` (sigmoid, ``beta = arte.beta``), ``data.source=pairs`` on
  ``pairs_path`` (batches of ``min(arte.dpo_batch_size, num_pairs)``), ``arte.dpo_steps`` steps
  of ``arte.dpo_lr`` (a tenth of them warmup), no evaluation, one checkpoint at the end."""
  a = cfg.arte
  c = copy.deepcopy(cfg)
  steps = int(a.dpo_steps)
  with c.unlocked():
    c.student.update(dict(source="layers", every=1, init_from="", path=""))
    c.teacher.online = True
    c.objective = {"dpo": {"term": "dpo", "weight": 1.0, "beta": float(a.beta),
                           "loss_type": "sigmoid"}}
    c.optimizer.update(dict(lr=float(a.dpo_lr), warmup_steps=steps // 10))
    c.data.update(dict(source="pairs", path=pairs_path, eval_path="", shape="", pack=False,
                       select="", batch_size=min(int(a.dpo_batch_size), int(num_pairs))))
    c.train.update(dict(steps=steps, grad_accum=1, log_every=1))
    c.eval.update(dict(every=0, at_start=False))
    c.checkpoint.update(dict(every=0, keep=1, best_metric="", async_save=False))
    c.report.enabled = False
    if "onpolicy" in c:
      c.onpolicy.mode = ""
  return c


def _last_dpo_metrics(workdir: str) -> dict[str, float]:
  from jkd.train.writer import read_metrics  # noqa: PLC0415
  lines = [m for m in read_metrics(workdir) if "loss/dpo" in m]
  if not lines:
    return {}
  last = lines[-1]
  return {"dpo_loss": last["loss/dpo"],
          "dpo_reward_accuracy": last.get("dpo/rewards/accuracies", float("nan")),
          "dpo_reward_margin": last.get("dpo/rewards/margins", float("nan"))}


def tune_teacher(cfg, teacher, pairs_path: str, num_pairs: int, workdir: str):
  """``(tuned parameters, last-step figures)``: :func:`dpo_config`'s run in ``workdir``."""
  from jkd.train import loop  # noqa: PLC0415  (the engine imports this module)
  result = loop.train(dpo_config(cfg, pairs_path, num_pairs), workdir, teacher=teacher)
  if result["status"] != "done":
    raise stopping.Stopped("SIGTERM while DPO tuned the teacher")
  return result["state"].params, _last_dpo_metrics(workdir)


# ---------------------------------------------------------------------------------------------
# The prepared source.

def _initial_student(cfg, teacher, validation: Mapping[str, np.ndarray]):
  """The student training starts from (for ``prune``: measured on the validation rows)."""
  scfg = build.student_config(cfg, teacher.config)
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  b = min(int(cfg.data.batch_size), len(validation["tokens"]))
  calibration = lambda n: [{k: v[:b] for k, v in validation.items()}] * n  # noqa: E731
  params = build.student_params(
      cfg, scfg, teacher, build.param_shardings(scfg, mesh, sharding.DEFAULT_RULES),
      jax.random.fold_in(jax.random.key(int(cfg.seed)), setup_lib.STUDENT_KEY), calibration)
  return scfg, params


def _score_drafts(cfg, a, student, tokenizer, drafts: list[dict], validation, arte_dir: str,
                  vocab: int) -> tuple[str, int, dict[str, Any]]:
  """Scores the drafts and writes the pairs; ``(pairs path, pair count, figures)``."""
  d = cfg.data
  arrays, kept = tokenize_records(drafts, tokenizer, shape="prompt_completion",
                                  seq_len=int(d.seq_len), chat_template=bool(d.chat_template),
                                  vocab_size=vocab, what="drafts")
  key = _digest(arrays["tokens"], arrays["labels"], arrays["loss_mask"], validation["tokens"],
                validation["labels"], validation["loss_mask"], json.loads(
                    cfg.student.to_json_best_effort()), float(a.lookahead_lr),
                int(a.lookahead_steps), float(a.min_gap), int(d.seq_len), int(cfg.seed))
  pairs_path = os.path.join(arte_dir, f"pairs-{key}.npz")
  scores_path = os.path.join(arte_dir, f"drafts-{key}.jsonl")
  summary_path = os.path.join(arte_dir, f"scores-{key}.json")
  if os.path.exists(pairs_path) and os.path.exists(summary_path):
    with open(summary_path) as f:
      figures = json.load(f)
    return pairs_path, int(figures["pairs"]), figures
  scfg, params = student
  gains = arte_lib.student_gains(params, scfg, arrays, validation,
                                 lr=float(a.lookahead_lr), steps=int(a.lookahead_steps),
                                 batch_size=int(a.score_batch_size))
  scored = [drafts[i] for i in kept]
  groups = [r["id"].rsplit("#", 1)[0] for r in scored]
  counts = {g: groups.count(g) for g in set(groups)}
  usable = [i for i, g in enumerate(groups) if counts[g] >= 2]  # Empty drafts were dropped.
  if not usable:
    raise ValueError("no prompt has two scorable drafts (the teacher's drafts were empty or"
                     " cut off by data.seq_len): raise data.seq_len or arte.n.")
  ranked = arte_lib.rank_drafts([groups[i] for i in usable], gains[usable],
                                min_gap=float(a.min_gap))
  chosen = [scored[usable[i]] for i in ranked.chosen]
  rejected = [scored[usable[i]] for i in ranked.rejected]
  text_pairs = [{"prompt": c["prompt"], "chosen": c["completion"],
                 "rejected": r["completion"]} for c, r in zip(chosen, rejected)]
  rows = []
  for p in text_pairs:
    try:
      row = preference.tokenize_preference(p, tokenizer, seq_len=int(d.seq_len),
                                           chat_template=bool(d.chat_template),
                                           overflow="drop")
    except ValueError:  # Identical once tokenized: no preference signal.
      row = None
    if row is not None:
      rows.append(row)
  if not rows:
    raise ValueError(f"ARTE made no preference pair from {len(set(groups))} prompts (every"
                     " prompt's drafts scored within arte.min_gap, or the pairs did not fit"
                     f" data.seq_len={d.seq_len}): raise arte.n, arte.temperature or"
                     " arte.prompts, or lower arte.min_gap.")
  arrays_out = {k: np.stack([r[k] for r in rows]) for k in preference.TOKEN_FIELDS}
  chosen_gain = gains[[usable[i] for i in ranked.chosen]]
  rejected_gain = gains[[usable[i] for i in ranked.rejected]]
  figures = {"drafts": len(drafts), "scored_drafts": len(kept),
             "draft_gain_mean": float(gains.mean()), "draft_gain_std": float(gains.std()),
             "chosen_gain_mean": float(chosen_gain.mean()),
             "rejected_gain_mean": float(rejected_gain.mean()),
             "pairs": len(rows), "skipped_prompts": len(ranked.skipped)}
  _atomic(scores_path, lambda f: f.write("".join(
      json.dumps({**r, "gain": float(g)}, ensure_ascii=False) + "\n"
      for r, g in zip(scored, gains)).encode()))
  _atomic(pairs_path, lambda f: np.savez(f, **arrays_out))
  _atomic(summary_path, lambda f: f.write(json.dumps(figures, indent=2).encode()))
  return pairs_path, len(rows), figures


def _targets(cfg, a, tokenizer, held: list[dict], vocab: int):
  """``(validation arrays, eval records and shape or None, eval prompt records)``."""
  d = cfg.data
  common = dict(seq_len=int(d.seq_len), chat_template=bool(d.chat_template), vocab_size=vocab)
  validation_held, eval_held = held[0::2], held[1::2]
  if a.validation:
    records, shape = read_target(a.validation)
  else:
    if not validation_held:
      raise ValueError("ARTE's validation set is empty: no prompt is held out. Give"
                       " arte.validation (a JSONL of target examples) or lower"
                       " corpus.holdout_every.")
    records, shape = [{"text": r["prompt"]} for r in validation_held], "text"
  validation, _ = tokenize_records(records, tokenizer, shape=shape, what="validation examples",
                                   **common)
  if a.eval:
    return validation, read_target(a.eval), []
  if not eval_held:
    raise ValueError("ARTE's eval set is empty: fewer than two prompts are held out. Give"
                     " arte.eval (a JSONL of target examples) or lower corpus.holdout_every.")
  return validation, None, eval_held


def prepare_arte(cfg, workdir: str, teacher, tokenizer) -> corpus_source.Prepared:
  """ARTE's tailored corpus (train), the target eval set, and the golden text, as batch sources.

  Args:
    cfg: the run's config (``arte``, ``corpus`` and ``data`` sections).
    workdir: the run's directory (``data/`` and ``arte/`` are written there).
    teacher: the built teacher (:class:`jkd.train.build.Teacher`).
    tokenizer: the teacher's tokenizer.

  Returns:
    :class:`jkd.train.sources.corpus.Prepared`; its facts hold the stage figures.
  """
  if jax.process_count() > 1:
    raise ValueError("data.source=arte_corpus runs in a single process (it samples, scores and"
                     " tunes the teacher before training).")
  check_options(cfg)
  a, c, d = cfg.arte, cfg.corpus, cfg.data
  t0 = time.perf_counter()
  records = corpus_lib.read_prompts(os.path.expanduser(c.prompts or corpus_lib.SHIPPED_PROMPTS))
  train_records, held = corpus_source.split_prompts(records, int(c.holdout_every))
  if int(c.limit) > 0:
    train_records = train_records[:int(c.limit)]
  if not train_records:
    raise ValueError("no training prompt: every prompt is held out (raise"
                     " corpus.holdout_every or give more prompts).")
  vocab = teacher.config.vocab_size
  out_dir, arte_dir = os.path.join(workdir, "data"), os.path.join(workdir, "arte")
  os.makedirs(arte_dir, exist_ok=True)
  validation, eval_target, eval_held = _targets(cfg, a, tokenizer, held, vocab)
  student = _initial_student(cfg, teacher, validation)
  figures: dict[str, Any] = {"tune": bool(a.tune), "validation_examples":
                             len(validation["tokens"])}
  params = teacher.params
  if a.tune:
    seeds = train_records[:int(a.prompts)] if int(a.prompts) > 0 else train_records
    draft_records = [dict(r, id=f"{r['id']}#{j}") for r in seeds for j in range(int(a.n))]
    _say(f"ARTE: the teacher drafts {len(draft_records)} answers ({a.n} for each of"
         f" {len(seeds)} prompts)")
    drafts_path = write_corpus(cfg, teacher.params, teacher.config, tokenizer, draft_records,
                               out_dir, "arte_drafts", temperature=float(a.temperature))
    pairs_path, num_pairs, scored = _score_drafts(cfg, a, student, tokenizer,
                                                  _read_corpus(drafts_path), validation,
                                                  arte_dir, vocab)
    figures.update(scored)
    _say(f"ARTE: draft gains {scored['draft_gain_mean']:.4g} +- {scored['draft_gain_std']:.3g}"
         f" (chosen {scored['chosen_gain_mean']:.4g}, rejected"
         f" {scored['rejected_gain_mean']:.4g}); {num_pairs} pairs")
    stopping.check()
    dpo_dir = os.path.join(arte_dir, "dpo-" + os.path.basename(pairs_path)[6:-4])
    params, dpo = tune_teacher(cfg, teacher, pairs_path, num_pairs, dpo_dir)
    figures.update(dpo)
    _say(f"ARTE: DPO-tuned the teacher ({a.dpo_steps} steps): last reward accuracy"
         f" {dpo.get('dpo_reward_accuracy', float('nan')):.3f}, margin"
         f" {dpo.get('dpo_reward_margin', float('nan')):.4g}")
  _say(f"ARTE: the {'tuned' if a.tune else 'untuned'} teacher answers {len(train_records)}"
       " training prompts")
  train_path = write_corpus(cfg, params, teacher.config, tokenizer, train_records, out_dir,
                            "arte_train")
  meta = store.read_metadata(train_path)
  common = dict(seq_len=int(d.seq_len), chat_template=bool(d.chat_template), vocab_size=vocab)
  corpus_arrays, _ = tokenize_records(_read_corpus(train_path), tokenizer,
                                      shape="prompt_completion", what="corpus examples",
                                      **common)
  scfg, sparams = student
  corpus_gain = arte_lib.student_gains(sparams, scfg, corpus_arrays, validation,
                                       lr=float(a.lookahead_lr), steps=int(a.lookahead_steps),
                                       batch_size=int(a.score_batch_size))
  figures.update({"corpus_examples": int(meta["count"]),
                  "corpus_tokens": int(meta["completion_tokens"]),
                  "corpus_gain_mean": float(corpus_gain.mean())})
  _say(f"ARTE: corpus of {meta['count']} answers ({meta['completion_tokens']} tokens), mean"
       f" gain {figures['corpus_gain_mean']:.4g}")
  eval_batch = int(d.batch_size)
  golden = None
  if eval_target is not None:
    eval_arrays, _ = tokenize_records(eval_target[0], tokenizer, shape=eval_target[1],
                                      what="eval examples", **common)
    eval_source = ArraySource(eval_arrays, min(eval_batch, len(eval_arrays["tokens"])),
                              shuffle=False)
  else:  # The untuned teacher's answers to the other held-out prompts, as teacher_corpus.
    eval_path = write_corpus(cfg, teacher.params, teacher.config, tokenizer, eval_held,
                             out_dir, "arte_eval")
    eval_batch = min(eval_batch, len(eval_held))
    text = dict(tokenizer=tokenizer, seq_len=int(d.seq_len), vocab_size=vocab,
                chat_template=bool(d.chat_template), overflow=d.overflow)
    eval_source = pipeline.text_pipeline(eval_path, "train", batch_size=eval_batch,
                                         shuffle=False, **text)
    golden = pipeline.text_pipeline(_golden(eval_held, out_dir, "arte_golden"), "train",
                                    batch_size=eval_batch, shuffle=False, **text)
  seconds = time.perf_counter() - t0
  figures["seconds"] = seconds
  _atomic(os.path.join(arte_dir, "summary.json"),
          lambda f: f.write(json.dumps(figures, indent=2).encode()))
  train = pipeline.text_pipeline(train_path, "train", batch_size=int(d.batch_size),
                                 pack=bool(d.pack), seed=int(d.seed), tokenizer=tokenizer,
                                 seq_len=int(d.seq_len), vocab_size=vocab,
                                 chat_template=bool(d.chat_template), overflow=d.overflow)
  facts = {"train prompts": len(train_records), "held-out prompts": len(held),
           "corpus dir": out_dir, **{f"arte {k}": v for k, v in figures.items()}}
  return corpus_source.Prepared(train=train, eval=eval_source, golden=golden,
                                held_out=eval_held or held, seconds=seconds, facts=facts)
