"""Every recipe in configs/: it locks, documents its command, and its CPU variant trains.

Configs are found by glob, so recipes added later are covered. A config module may define
``CPU_VARIANTS`` (default ``("cpu",)``) and ``make_cpu_data(workdir[, arg])`` returning config
overrides (``{"data.path": ...}``) for data a variant reads from disk. ``demo.py`` and
``kd_tiny.py``, and the recipes with dedicated end-to-end tests, are run by those tests
(:data:`OWN_TESTS`).
"""

import glob
import inspect
import json
import math
import os

import numpy as np
import pytest

from jkd import losses
from jkd import models
from jkd.train import loop, recipes, sources, stages
from jkd.train import step as step_lib
from jkd.data import ArraySource, synthetic_lm_examples
from jkd.train.writer import read_metrics
from recipe_configs import load_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs",
                                                                         "*.py"))
                 if not os.path.basename(p).startswith("_"))
#: Configs that are CPU-sized themselves, run end to end by their own tests.
OWN_TESTS = {"demo": "tests/test_demo.py (its 'tiny' variant)",
             "kd_tiny": "tests/test_train_loop.py",
             "adpa": "tests/test_recipes_alignment.py", "distill_dpo":
             "tests/test_recipes_alignment.py", "miniplm": "tests/test_recipes_selection.py",
             "ddk": "tests/test_recipes_selection.py",
             "multi_teacher": "tests/test_multi_teacher.py (trained tiny teachers per domain)",
             "self_imitation": "tests/test_self_imitation.py",
             "arte": "tests/test_arte.py (a trained tiny teacher, tuned and untuned)",
             "dual_head": "tests/test_dual_head.py"}
RECIPES = [n for n in CONFIGS if n not in OWN_TESTS]


load = load_module


def cpu_runs():
  runs = []
  for name in RECIPES:
    for variant in getattr(load(name), "CPU_VARIANTS", ("cpu",)):
      runs.append(pytest.param(name, variant, id=f"{name}:{variant}"))
  return runs


@pytest.mark.parametrize("name", CONFIGS)
def test_config_locks_and_documents_its_command(name):
  module = load(name)
  assert f"python -m jkd.train --config configs/{name}.py" in (module.__doc__ or "")
  cfg = module.get_config()
  cfg.lock()
  losses.build_objective(cfg.objective)  # Terms and options are valid.
  with pytest.raises(AttributeError):  # Locked: a misspelt key is an error.
    cfg.optimizer.learning_rate = 1.0
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("no_such_variant")
  if name not in OWN_TESTS:
    for variant in getattr(module, "CPU_VARIANTS", ("cpu",)):
      module.get_config(variant).lock()


def _data_overrides(module, workdir, variant):
  make = getattr(module, "make_cpu_data", None)
  if make is None:
    return {}
  takes_arg = len(inspect.signature(make).parameters) > 1
  out = make(workdir, variant) if takes_arg else make(workdir)
  if isinstance(out, str):
    return {"data.path": out}
  return dict(out or {})


def _run(cfg, workdir):
  result = stages.run(cfg, workdir)
  lines = [m for m in read_metrics(workdir) if "loss/total" in m]
  return result, lines


@pytest.mark.parametrize("name,variant", cpu_runs())
def test_cpu_variant_trains_end_to_end(name, variant, tmp_path):
  module = load(name)
  cfg = module.get_config(variant)
  recipes.apply_overrides(cfg, _data_overrides(module, str(tmp_path / "data"), variant))
  cfg.lock()
  assert cfg.teacher.source == "random", "a CPU variant uses a tiny random teacher"
  assert cfg.teacher.model.vocab_size <= 256 and cfg.teacher.model.hidden_size <= 128
  steps = int(cfg.train.steps)
  assert steps <= 8
  result, lines = _run(cfg, str(tmp_path / "run"))
  assert result["status"] == "done" and result["step"] == steps
  assert [m["step"] for m in lines] == list(range(1, steps + 1))
  terms = list(cfg.objective.keys())
  assert terms
  for m in lines:
    assert math.isfinite(m["loss/total"]) and m["train/finite"] == 1.0, m
    for term in terms:  # Every configured term is computed and logged at every step.
      assert math.isfinite(m[f"loss/{term}"]), (term, m)
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["train"]["steps"] == steps
  if not cfg.teacher.online and result["eval"]:
    assert not any(k.startswith("eval/teacher") or k == "eval/kl_forward" for k in result["eval"])


def test_dpo_cpu_from_a_jsonl_file_of_text_pairs(tmp_path):
  """data.source=preference: text pairs tokenised with the CPU teacher's char tokenizer."""
  pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"}
           for w in ("hello", "world", "apple", "river", "stone", "cloud", "green", "light")]
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  cfg = load("dpo").get_config("cpu")
  cfg.data.update(dict(source="preference", path=str(path), seq_len=32,
                       cache_dir=str(tmp_path / "cache")))
  cfg.lock()
  result, lines = _run(cfg, str(tmp_path / "run"))
  assert result["step"] == cfg.train.steps and len(lines) == cfg.train.steps
  assert abs(lines[0]["dpo/rewards/margins"]) < 1e-6  # The policy is the reference's copy.
  assert all(math.isfinite(m["loss/dpo"]) and m["train/tokens"] > 0 for m in lines)


def test_preference_source_errors_name_the_fix(tmp_path):
  cfg = load("dpo").get_config("cpu")
  cfg.data.update(dict(source="preference", path=""))
  with pytest.raises(ValueError, match="needs data.path"):
    _run(cfg, str(tmp_path / "a"))
  cfg.data.update(dict(source="synthetic_pairs", shape="unpaired", batch_size=3))
  with pytest.raises(ValueError, match="must be even"):
    _run(cfg, str(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------
# teacher.online=False

def _tiny(objective, *, online=False, steps=2):
  cfg = recipes.cpu_variant(load("kd_forward").get_config("cpu"), steps=steps)
  cfg.objective = objective
  cfg.teacher.online = online
  return cfg


def _cache_arrays(cfg, n=8):
  """A full-vocabulary (k = V) cache of the CPU teacher, in memory (float16 as on disk)."""
  import jax  # noqa: PLC0415
  from jkd.train import build  # noqa: PLC0415
  spec = build.teacher_spec(cfg)
  params = models.init_params(spec.config, jax.random.fold_in(jax.random.key(cfg.seed), 0))
  ex = synthetic_lm_examples(n, cfg.data.seq_len, spec.config.vocab_size, seed=1)
  logits = np.asarray(models.apply(params, ex["tokens"], config=spec.config).logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  order = np.argsort(-logp, axis=-1)
  ex.update(teacher_topk_ids=order.astype(np.int32),
            teacher_topk_logprobs=np.take_along_axis(logp, order, -1).astype(np.float16),
            teacher_tail_logprob=np.full(logp.shape[:-1], -30.0, np.float16))
  return ex, logp


def test_offline_teacher_matches_online_and_reports_student_metrics(tmp_path):
  """The first step's forward KL from a k=V cache (teacher dropped) equals the online one."""
  objective = {"kd": {"term": "forward_kl"}}
  cfg = _tiny(objective, steps=1)
  ex, logp = _cache_arrays(cfg)
  lm = {k: ex[k] for k in ("tokens", "labels", "loss_mask")}
  kl = {}
  for online in (True, False):
    run = _tiny(objective, online=online, steps=1)
    source = ArraySource(ex if not online else lm, batch_size=8, seed=0)
    out = loop.train(run, str(tmp_path / str(online)), train_source=source,
                     eval_source=ArraySource(lm, batch_size=4, shuffle=False))
    kl[online] = [m for m in read_metrics(str(tmp_path / str(online))) if "loss/kd" in m][0]
    evals = out["eval"]
    assert ("eval/kl_forward" in evals) == online and ("eval/teacher_nll" in evals) == online
    assert "eval/student_nll" in evals
  # Float64 NumPy reference: KL(teacher || initial student), mean over all positions (one
  # batch holds the 8 examples); the student is the teacher's every-2nd-layer copy.
  import jax  # noqa: PLC0415
  from jkd.train import build  # noqa: PLC0415
  config = build.teacher_spec(cfg).config
  params = models.init_params(config, jax.random.fold_in(jax.random.key(cfg.seed), 0))
  s_config, s_params = models.student_from_teacher(params, config, every=2)
  zs = np.asarray(models.apply(s_params, ex["tokens"], config=s_config).logits, np.float64)
  logq = zs - zs.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  want = float(np.mean(np.sum(np.exp(logp) * (logp - logq), -1)))
  assert want > 0
  np.testing.assert_allclose(kl[True]["loss/kd"], want, rtol=1e-3)
  np.testing.assert_allclose(kl[False]["loss/kd"], want, rtol=2e-2)


@pytest.mark.parametrize("objective,match", [
    ({"kd": {"term": "forward_kl"}}, "teacher_topk_ids"),
    ({"hs": {"term": "hidden_state"}}, "teacher_hiddens"),
])
def test_offline_teacher_needs_a_sparse_teacher_in_the_batch(objective, match, tmp_path):
  cfg = _tiny(objective)
  with pytest.raises(ValueError, match=f"teacher.online=False.*{match}.*set teacher.online=True"):
    loop.train(cfg, str(tmp_path))


def test_offline_preference_needs_a_reference(tmp_path):
  cfg = load("dpo").get_config("cpu")
  cfg.teacher.online = False
  with pytest.raises(ValueError, match="teacher.online=False: loss term 'dpo' needs"):
    _run(cfg, str(tmp_path))


def test_check_teacher_free_accepts_a_cached_batch():
  cfg = _tiny({"kd": {"term": "generalized_jsd"}, "ce": {"term": "cross_entropy"}})
  ex, _ = _cache_arrays(cfg, n=2)
  import jax  # noqa: PLC0415
  config = models.ModelConfig(**recipes.CPU_TEACHER)
  params = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  step_lib.check_teacher_free(losses.build_objective(cfg.objective), params, ex,
                              student_config=config)  # No error.
  with pytest.raises(ValueError, match="loss term 'kd' needs"):
    step_lib.check_teacher_free(losses.build_objective(cfg.objective), params,
                                {k: ex[k] for k in ("tokens", "labels")}, student_config=config)


def test_configs_carry_only_the_sections_they_use():
  from jkd.train import config as config_lib  # noqa: PLC0415
  optional = set(config_lib.OPTIONAL_SECTIONS)
  assert not optional & set(load("kd_tiny").get_config())  # synthetic data, no extras
  assert optional & set(load("demo").get_config()) == {"corpus"}
  assert optional & set(load("gkd").get_config()) == {"corpus", "onpolicy"}
  assert optional & set(load("distill_dpo").get_config()) == {"rounds"}
  assert optional & set(load("ddk").get_config()) == {"ddk"}
  cfg = load("kd_tiny").get_config()
  cfg.data.source = "rounds"
  with pytest.raises(ValueError, match=r"data.source='rounds' needs the config section 'rounds',"
                     r" which this config lacks: add it .*add_sections\(c, 'rounds'\)"):
    sources.make_sources(cfg, 128, tokenizer=object())
