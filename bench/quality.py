"""Method leaderboard: distillation objectives on the main job's student and corpus, 3 seeds each.

    python bench/quality.py --workdir /tmp/jkd_quality                    # the main job
    python bench/quality.py --workdir /tmp/jkd_quality --arg tiny --steps 4  # seconds
    python bench/quality.py --workdir /tmp/jkd_quality --methods ce_only,forward_kl --seeds 2 \\
        --corpus_from /tmp/jkd_demo

Every method trains ``configs/demo.py``'s student (``get_config(--arg)`` as it is, teacher
online) on the same teacher-written corpus for the same number of steps, once per seed, through
:func:`jkd.train.stages.run`; :data:`METHODS` changes only the objective (and, for GKD, the
``onpolicy`` section). To compare objectives and not mixtures, each distillation method is its
divergence **alone, weight 1** (the main job adds 0.1 cross-entropy to its GJSD; here no method
does), and ``ce_only`` is cross-entropy alone on the teacher's text (sequence-level KD, Kim &
Rush 2016: the teacher's tokens without its distributions). Options are the papers' defaults as
``docs/methods.md`` gives them:

============  =====================================================================  ==========
name          objective                                                              methods.md
============  =====================================================================  ==========
ce_only       ``cross_entropy``                                                      §1.8, §7.1
forward_kl    ``forward_kl``                                                         §1.1
reverse_kl    ``reverse_kl``                                                         §1.2
gjsd          ``generalized_jsd`` ``beta=0.5``                                       §1.3
skew_kl       ``skew_kl`` ``alpha=0.1`` (DistiLLM's loss; its adaptive student        §1.4
              sampling is left out: it moves only between evaluations, here one)
akl           ``adaptive_kl`` ``mu=0.5``                                             §1.7
taid          ``taid`` ``t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99``,            §2
              ``total_steps`` = the steps
gkd           ``generalized_jsd`` ``beta=0.5`` + ``onpolicy.mode=gkd``, ``lmbda=0.5``,  §7.2
              ``temperature=0.9``, ``top_p=1``, ``max_new_tokens`` = the corpus's;
              stop and pad ids from the tokenizer
============  =====================================================================  ==========

Seeds ``0..--seeds-1``: seed ``s`` sets ``data.seed`` (the batch order) and ``seed`` (the
per-step key: on-policy sampling), except that with a ``random`` teacher (``--arg tiny``)
``seed`` also draws the teacher, so there it stays as configured and seeds vary the batch order
only. Every run starts from the same student: the config's, made once (a pruned student's
importance measured once) and saved to ``<workdir>/student_init`` (``student.init_from``).

The corpus is written once, by the first run (or copied from ``--corpus_from DIR``, a demo
workdir), and copied into every other run's workdir, so all runs read the same text. Each run
evaluates only at its end (``eval.every`` = the steps; the first run also at step 0, the
student-at-init row), without the report. After a run the trained student answers the held-out
prompts greedily (as many tokens as the corpus's answers) and two answer metrics are taken
(:mod:`jkd.train.answers`): the ROUGE-L F1 of its answers against the teacher's greedy answers,
and the teacher as judge, its NLL per token of the student's answers. The table gives, per
method, mean ± sample standard deviation (``ddof=1``) over the seeds of:

* NLL, KL(teacher || student), top-1 agreement and ECE on the held-out teacher text, and the
  NLL of the held-out human-written text (golden), from :func:`jkd.train.report.summarize`;
* ROUGE-L and the judge's NLL;
* the median seconds per step and the wall time of a run (the first includes the corpus).

Verdict, per distillation method against ``ce_only``, on KL and on top-1 agreement: the method
is *ahead by more than two standard deviations* when its mean is better (lower KL, higher top-1)
by more than ``2 * max(std_method, std_ce_only)``, the larger of the two sample standard
deviations (a conservative rule of thumb, not a significance test; it needs two seeds or more).

Compiled programs are kept in a persistent JAX compilation cache (``--compile_cache``, default
``<workdir>/jax_cache``; process-wide, set before the first run trains): the seeds of a method,
and the evaluation and sampling programs of all methods, compile once (in seconds on
``--arg tiny``: 4 runs take about 40 s instead of 80 s here).

Runs are resumable: a method/seed whose ``<workdir>/<method>/seed<s>/quality.json`` exists is
not run again, a killed run resumes from its checkpoint, and the teacher's answers are kept in
``<workdir>/answers.json``. A finished run's checkpoints are deleted (``--keep_checkpoints``
keeps them: a 6-layer SmolLM2 student with its optimizer state is about 0.6 GB a checkpoint).
Writes ``--out`` (markdown) and the same path with ``.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Metric key -> (column label, lower is better). ``eval/`` keys, then ``golden/`` and answers.
METRICS = {
    "student_nll": ("NLL", True),
    "kl_forward": ("KL", True),
    "top1_agreement": ("top-1", False),
    "student_ece": ("ECE", True),
    "golden_nll": ("golden NLL", True),
    "rouge_l": ("ROUGE-L", False),
    "judge_nll": ("judge NLL", True),
}
#: The verdict's metrics.
VERDICT_METRICS = ("kl_forward", "top1_agreement")
CORPUS_DATASETS = ("corpus_train", "corpus_eval", "golden")
RESULT_FILE = "quality.json"


# ---------------------------------------------------------------------------------------------
# Methods: each sets the objective (and sections) of a copy of the main job's config.

def _objective(cfg, term: str, **options) -> None:
  cfg.objective = {"kd": {"term": term, "weight": 1.0, **options}}


def ce_only(cfg) -> None:
  """Cross-entropy on the teacher's text alone (sequence-level KD)."""
  cfg.objective = {"ce": {"term": "cross_entropy", "weight": 1.0}}


def forward_kl(cfg) -> None:
  """KL(teacher || student) (Hinton et al. 2015)."""
  _objective(cfg, "forward_kl")


def reverse_kl(cfg) -> None:
  """KL(student || teacher) (MiniLLM's token-level loss, Gu et al. 2024)."""
  _objective(cfg, "reverse_kl")


def gjsd(cfg) -> None:
  """Generalized JSD, beta 0.5 (Agarwal et al. 2024), off-policy."""
  _objective(cfg, "generalized_jsd", beta=0.5)


def skew_kl(cfg) -> None:
  """Skew KL, alpha 0.1 (DistiLLM, Ko et al. 2024), off-policy."""
  _objective(cfg, "skew_kl", alpha=0.1)


def akl(cfg) -> None:
  """Adaptive KL, mu 0.5 (Wu et al. 2025)."""
  _objective(cfg, "adaptive_kl", mu=0.5)


def taid(cfg) -> None:
  """TAID's interpolated target and schedule over the run's steps (Shing et al. 2025)."""
  _objective(cfg, "taid", total_steps=int(cfg.train.steps), t_start=0.4, t_end=1.0,
             alpha=5e-4, beta=0.99)


def gkd(cfg) -> None:
  """On-policy GKD: GJSD beta 0.5; half the batches hold the student's samples (temperature
  0.9) of the batch's prompts, as long as the corpus's answers. The stop and pad ids are set
  from the tokenizer by :func:`_set_stop_ids`."""
  from jkd.train.config import add_sections  # noqa: PLC0415
  _objective(cfg, "generalized_jsd", beta=0.5)
  add_sections(cfg, "onpolicy")
  cfg.onpolicy.update(dict(mode="gkd", lmbda=0.5, temperature=0.9, top_p=1.0,
                           max_new_tokens=int(cfg.corpus.max_new_tokens)))


#: Method name -> ``fn(cfg)`` that sets its objective in place. ``ce_only`` is the baseline.
METHODS: dict[str, Callable[[Any], None]] = {
    "ce_only": ce_only, "forward_kl": forward_kl, "reverse_kl": reverse_kl, "gjsd": gjsd,
    "skew_kl": skew_kl, "akl": akl, "taid": taid, "gkd": gkd,
}
BASELINE = "ce_only"


def _set_stop_ids(cfg, tokenizer) -> None:
  """On-policy sampling stops at the tokenizer's end-of-turn token (its EOS if it has none)."""
  if not cfg.get("onpolicy", {}).get("mode"):
    return
  from jkd.data import corpus as corpus_lib  # noqa: PLC0415
  vocab = tokenizer.get_vocab()
  turn = [vocab[t] for t in corpus_lib.END_OF_TURN_TOKENS if t in vocab]
  eos = int(turn[0]) if turn else int(tokenizer.eos_token_id)
  pad = tokenizer.pad_token_id
  cfg.onpolicy.update(dict(eos_id=eos, pad_id=eos if pad is None else int(pad)))


# ---------------------------------------------------------------------------------------------
# Runs.

def _config(path: str, arg: str | None):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_config(base_path: str, arg: str | None, method: str, seed: int, *, steps: int,
               at_start: bool):
  """The config of one run: the base config with the method's objective and the seed."""
  cfg = _config(base_path, arg)
  if steps:
    cfg.train.steps = steps
  cfg.teacher.online = True  # The evaluation's KL and top-1 need the teacher's logits.
  if "onpolicy" in cfg:  # Off unless the method turns it on.
    cfg.onpolicy.mode = ""
  METHODS[method](cfg)
  cfg.data.seed = seed
  if cfg.teacher.source != "random":  # A random teacher is drawn from `seed`: keep it.
    cfg.seed = seed
  cfg.eval.update(dict(every=int(cfg.train.steps), at_start=at_start))
  cfg.report.enabled = False
  return cfg


def _has_corpus(workdir: str) -> bool:
  return all(os.path.exists(os.path.join(workdir, "data", name, "1.0.0", "dataset_info.json"))
             for name in CORPUS_DATASETS)


def _copy_corpus(source: str, workdir: str) -> None:
  if not _has_corpus(source):
    raise ValueError(f"{source!r} holds no finished teacher corpus ({', '.join(CORPUS_DATASETS)}"
                     " under data/): give --corpus_from a workdir of configs/demo.py that has"
                     " run, or leave it out to write the corpus in the first run.")
  target = os.path.join(workdir, "data")
  if os.path.exists(target):
    return
  os.makedirs(workdir, exist_ok=True)
  shutil.copytree(os.path.join(source, "data"), target + ".copying", dirs_exist_ok=True)
  os.replace(target + ".copying", target)


class References:
  """What every run is compared with, built once the corpus exists (from the config of the run
  that wrote or first read it): the teacher, the tokenizer, the held-out prompts, the teacher's
  greedy answers and the initial student's (cached in ``<workdir>/answers.json``)."""

  def __init__(self, cfg, run_dir: str, cache: str):
    import jax  # noqa: PLC0415

    from jkd.data import corpus as corpus_lib  # noqa: PLC0415
    from jkd.data import store  # noqa: PLC0415
    from jkd.train import answers  # noqa: PLC0415
    from jkd.train import build  # noqa: PLC0415
    from jkd.train import setup  # noqa: PLC0415
    from jkd.train import sharding  # noqa: PLC0415
    from jkd.train import sources  # noqa: PLC0415
    self.answers = answers
    mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
    key = jax.random.key(int(cfg.seed))
    self.teacher = build.build_teacher(build.teacher_spec(cfg), mesh, sharding.DEFAULT_RULES,
                                       jax.random.fold_in(key, setup.TEACHER_KEY))
    self.tokenizer = build.tokenizer_for(cfg)
    self.student_config = build.student_config(cfg, self.teacher.config)
    self.max_new_tokens = int(cfg.corpus.max_new_tokens)
    meta = store.read_metadata(os.path.join(run_dir, "data", "corpus_eval", "1.0.0"))
    if meta.get("teacher_fingerprint") != corpus_lib.teacher_fingerprint(self.teacher.params,
                                                                         self.teacher.config):
      raise ValueError(f"the corpus in {run_dir}/data was written by another teacher than"
                       f" {cfg.teacher.source!r} of this config: use the same --config/--arg"
                       " as the corpus's run, or another --corpus_from.")
    # The run's data as jkd.train.stages prepares it (the corpus is there: nothing is written).
    prepared = sources.data_source(cfg).prepare(cfg, run_dir, self.teacher, self.tokenizer)
    self.prompts = [h["prompt"] for h in prepared.held_out]
    # Every run starts from this student, saved once (a pruned student measures the teacher
    # on the first training batches: done once, not per run).
    self.student_init = os.path.join(os.path.dirname(cache), "student_init")
    have_student = os.path.exists(os.path.join(self.student_init, "config.json"))
    if os.path.exists(cache) and have_student:
      with open(cache) as f:
        saved = json.load(f)
      if saved["prompts"] != self.prompts:
        raise ValueError(f"{cache} holds answers to other prompts than the corpus in"
                         f" {run_dir}: delete it (it is recomputed).")
      self.saved, self.teacher_answers = saved, saved["teacher"]
      return
    self.teacher_answers = self.greedy(self.teacher.params, self.teacher.config)
    student0 = build.student_params(
        cfg, self.student_config, self.teacher,
        build.param_shardings(self.student_config, mesh, sharding.DEFAULT_RULES),
        jax.random.fold_in(key, setup.STUDENT_KEY),
        functools.partial(build.peek_batches, prepared.train))
    from jkd import models  # noqa: PLC0415
    models.save_hf(self.student_init + ".tmp", student0, self.student_config)
    shutil.rmtree(self.student_init, ignore_errors=True)
    os.replace(self.student_init + ".tmp", self.student_init)
    init_answers = self.greedy(student0, self.student_config)
    del student0
    self.saved = {"prompts": self.prompts, "teacher": self.teacher_answers,
                  "student_at_init": init_answers,
                  "teacher_metrics": {"judge_nll": self.judge(self.teacher_answers)},
                  "init_metrics": self.answer_metrics(init_answers)}
    _write_json(cache, self.saved)

  def greedy(self, params, config) -> list[str]:
    return self.answers.greedy_answers(params, config, self.tokenizer, self.prompts,
                                       self.max_new_tokens)

  def judge(self, texts: list[str]) -> float:
    return self.answers.judge_nll(self.teacher.params, self.teacher.config, self.tokenizer,
                                  self.prompts, texts)

  def answer_metrics(self, texts: list[str]) -> dict[str, float]:
    return {"rouge_l": self.answers.rouge_l(texts, self.teacher_answers),
            "judge_nll": self.judge(texts)}


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def _enable_compile_cache(path: str) -> None:
  """JAX's persistent compilation cache in ``path`` (process-wide; before the first compile)."""
  import jax  # noqa: PLC0415
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _run_one(args, method: str, seed: int, at_start: bool, run_dir: str, corpus_source: str,
             refs_box: dict) -> dict[str, Any]:
  """Trains one method/seed (or resumes it), then scores its answers; the facts as a dict."""
  _enable_compile_cache(args.compile_cache)
  from jkd.train import build  # noqa: PLC0415
  from jkd.train import stages  # noqa: PLC0415
  from jkd.train.report import summarize  # noqa: PLC0415
  from jkd.train.writer import read_metrics  # noqa: PLC0415
  cfg = run_config(args.config, args.arg, method, seed, steps=args.steps, at_start=at_start)
  if cfg.get("onpolicy", {}).get("mode"):
    _set_stop_ids(cfg, build.tokenizer_for(cfg))
  if corpus_source:
    _copy_corpus(corpus_source, run_dir)
  cache = os.path.join(args.workdir, "answers.json")
  if "refs" not in refs_box and _has_corpus(run_dir):
    refs_box["refs"] = References(cfg, run_dir, cache)
  if "refs" in refs_box:  # The same initial student for every run.
    cfg.student.init_from = refs_box["refs"].student_init
  print(f"== {method} seed {seed}: {run_dir}", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  result = stages.run(cfg, run_dir)
  seconds = time.perf_counter() - t0
  if result["status"] != "done":
    raise SystemExit(f"{method} seed {seed} stopped at step {result['step']} ({result['status']});"
                     " rerun the same command to continue.")
  if "refs" not in refs_box:
    refs_box["refs"] = References(cfg, run_dir, cache)
  refs = refs_box["refs"]
  texts = refs.greedy(result["state"].params, refs.student_config)
  del result
  facts = summarize(read_metrics(run_dir))
  metrics = {k: facts["after"][k] for k in METRICS if k in facts.get("after", {})}
  metrics["golden_nll"] = facts.get("golden_after", {}).get("student_nll", math.nan)
  metrics.update(refs.answer_metrics(texts))
  out = {"method": method, "seed": seed, "steps": int(cfg.train.steps), "seconds": seconds,
         "step_time_s": facts.get("throughput", {}).get("step_time_s", math.nan),
         "objective": cfg.objective.to_dict(),
         "onpolicy": cfg.onpolicy.to_dict() if cfg.get("onpolicy", {}).get("mode") else None,
         "metrics": metrics, "answers": texts}
  if facts.get("before", {}).get("step") == 0:
    out["before"] = {**{k: facts["before"][k] for k in METRICS if k in facts["before"]},
                     "golden_nll": facts.get("golden_before", {}).get("student_nll", math.nan)}
  out["teacher"] = {"student_nll": facts.get("teacher", {}).get("teacher_nll", math.nan),
                    "student_ece": facts.get("teacher", {}).get("teacher_ece", math.nan),
                    "golden_nll": facts.get("golden_after", {}).get("teacher_nll", math.nan)}
  _write_json(os.path.join(run_dir, RESULT_FILE), out)
  if not args.keep_checkpoints:
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return out


# ---------------------------------------------------------------------------------------------
# The table.

def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (``ddof=1``; NaN for fewer than two finite values)."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def verdict(method: dict[str, tuple[float, float]], baseline: dict[str, tuple[float, float]],
            key: str) -> dict[str, Any]:
  """Whether ``method`` beats ``baseline`` on ``key`` by more than 2 x the larger std."""
  (m, sm), (b, sb) = method[key], baseline[key]
  lower = METRICS[key][1]
  margin = (b - m) if lower else (m - b)
  threshold = 2 * max(sm, sb)
  return {"margin": margin, "two_std": threshold,
          "ahead": None if not math.isfinite(threshold) else bool(margin > threshold)}


def _fmt(x: float, digits: int = 4) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def summarize_runs(runs: list[dict], methods: list[str]) -> dict[str, Any]:
  """Per-method mean/std of every metric, the teacher and init rows, and the verdicts."""
  table: dict[str, Any] = {}
  for name in methods:
    mine = [r for r in runs if r["method"] == name]
    table[name] = {
        "seeds": [r["seed"] for r in mine],
        "objective": mine[0]["objective"], "onpolicy": mine[0]["onpolicy"],
        **{k: mean_std([r["metrics"].get(k, math.nan) for r in mine]) for k in METRICS},
        "step_time_s": mean_std([r["step_time_s"] for r in mine]),
        "seconds": mean_std([r["seconds"] for r in mine])}
  verdicts = {}
  if BASELINE in table:
    for name in methods:
      if name != BASELINE:
        verdicts[name] = {k: verdict(table[name], table[BASELINE], k) for k in VERDICT_METRICS}
  before = next((r["before"] for r in runs if "before" in r), {})
  return {"methods": table, "verdicts": verdicts, "init": before,
          "teacher": runs[0]["teacher"] if runs else {}}


def _markdown(summary: dict[str, Any], saved: dict[str, Any], title: str, steps: int,
              n_seeds: int) -> str:
  keys = list(METRICS)
  head = "| method | " + " | ".join(METRICS[k][0] for k in keys) + " | s/step | s/run |"
  lines = [f"# Method leaderboard: {title}, {steps} steps, {n_seeds} seed(s) each", "",
           "Same corpus, same initial student, same steps; mean ± sample std over seeds. NLL,"
           " KL(teacher \\|\\| student), top-1 agreement and ECE on the held-out teacher text;"
           " golden NLL on the held-out human text. Lower is better for NLLs, KL and ECE; higher"
           " for top-1 and ROUGE-L.", "",
           head, "|---" * (len(keys) + 3) + "|"]
  teacher = {**summary["teacher"], **saved.get("teacher_metrics", {})}
  lines.append("| teacher | " + " | ".join(_fmt(teacher.get(k, math.nan)) for k in keys)
               + " | - | - |")
  init = {**summary["init"], **saved.get("init_metrics", {})}
  lines.append("| student at init | " + " | ".join(_fmt(init.get(k, math.nan)) for k in keys)
               + " | - | - |")
  for name, row in summary["methods"].items():
    cells = []
    for k in keys + ["step_time_s", "seconds"]:
      m, s = row[k]
      cells.append(_fmt(m) + ("" if not math.isfinite(s) else f" ± {_fmt(s, 2)}"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Verdicts (ahead of CE only by more than 2 x the larger of the two sample"
            " stds):", ""]
  for name, v in summary["verdicts"].items():
    parts = []
    for k in VERDICT_METRICS:
      d = v[k]
      word = {True: "yes", False: "no", None: "n/a (needs 2+ seeds)"}[d["ahead"]]
      parts.append(f"on {METRICS[k][0]}: {word} (margin {_fmt(d['margin'], 3)},"
                   f" 2 std {_fmt(d['two_std'], 3)})")
    lines.append(f"- {name}: ahead of CE only by > 2 std " + "; ".join(parts))
  lines += ["", "Objectives:", ""]
  for name, row in summary["methods"].items():
    extra = ""
    if row["onpolicy"]:
      o = row["onpolicy"]
      extra = (f"; onpolicy mode={o['mode']} lmbda={o['lmbda']} temperature={o['temperature']}"
               f" max_new_tokens={o['max_new_tokens']} eos_id={o['eos_id']}")
    lines.append(f"- {name}: `{json.dumps(row['objective'], sort_keys=True)}`{extra}")
  lines += ["", "ROUGE-L: F1 of the student's greedy answers to the held-out prompts against the"
            " teacher's; judge NLL: the teacher's NLL per token of those answers (the teacher's"
            " row: of its own). s/run includes the corpus in the run that wrote it."]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.py"))
  parser.add_argument("--arg", default=None, help="config variant (e.g. tiny)")
  parser.add_argument("--steps", type=int, default=0, help="override train.steps")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, from {', '.join(METHODS)}")
  parser.add_argument("--corpus_from", default="", help="a demo workdir whose data/ to reuse")
  parser.add_argument("--keep_checkpoints", action="store_true")
  parser.add_argument("--compile_cache", default=None,
                      help="JAX compilation cache directory (default <workdir>/jax_cache;"
                      " '' for none)")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "quality.md"))
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
  if args.seeds < 1:
    parser.error("--seeds must be >= 1")
  os.makedirs(args.workdir, exist_ok=True)
  if args.compile_cache is None:
    args.compile_cache = os.path.join(args.workdir, "jax_cache")

  plan = [(m, s) for m in methods for s in range(args.seeds)]
  dirs = [os.path.join(args.workdir, m, f"seed{s}") for m, s in plan]
  runs, refs_box = [], {}
  for i, ((method, seed), run_dir) in enumerate(zip(plan, dirs)):
    done = os.path.join(run_dir, RESULT_FILE)
    if os.path.exists(done):
      with open(done) as f:
        runs.append(json.load(f))
      continue
    source = args.corpus_from or next((d for d in dirs if d != run_dir and _has_corpus(d)), "")
    runs.append(_run_one(args, method, seed, i == 0, run_dir, source, refs_box))
  cache = os.path.join(args.workdir, "answers.json")
  saved = {}
  if os.path.exists(cache):
    with open(cache) as f:
      saved = json.load(f)

  summary = summarize_runs(runs, methods)
  steps = runs[0]["steps"]
  title = os.path.basename(args.config) + (f":{args.arg}" if args.arg else "")
  text = _markdown(summary, saved, title, steps, args.seeds)
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  summary.update(config=title, steps=steps, seeds=args.seeds,
                 prompts=saved.get("prompts"), teacher_answers=saved.get("teacher"))
  _write_json(os.path.splitext(args.out)[0] + ".json", summary)
  return summary


if __name__ == "__main__":
  main()
