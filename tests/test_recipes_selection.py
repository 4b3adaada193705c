"""MiniPLM selection and DDK domain weights in the engine (jkd.train.sources.miniplm and
jkd.train.sources.ddk), end to end.

References: float64 NumPy log-softmax of each model's logits (each row run alone), MiniPLM's
score ``avg log p_teacher - avg log p_reference`` and DDK's weights
``(1 - f) s / sum(s) + f / N`` with ``s`` the smoothed gap, written from docs/methods.md §11.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from jkd.train import loop
from jkd.data import ArraySource, synthetic_lm_examples
from jkd.train.sources import ddk, miniplm
from jkd.train.writer import read_metrics
from tiny_models import TinyModel
from recipe_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TinyModel()
CONFIG, _init = TINY.config, TINY.init
np_token_logprobs = TINY.np_token_logprobs


@pytest.fixture(scope="module")
def nets():
  return {name: _init(jax.random.key(10 + i))
          for i, name in enumerate(("student", "teacher", "ref"))}


def one_process(**kw):
  return dict(process_index=0, process_count=1, **kw)


def test_miniplm_keeps_the_top_half_by_the_difference_score(nets):
  ex = synthetic_lm_examples(10, 8, CONFIG.vocab_size, seed=4)
  src = miniplm.SelectedSource(ArraySource(ex, 2, seed=1, **one_process()),
                                 reference=(nets["ref"], CONFIG), fraction=0.5, batch_size=4)
  src.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)
  score = (np_token_logprobs(nets["teacher"], ex["tokens"], ex["labels"]).mean(1)
           - np_token_logprobs(nets["ref"], ex["tokens"], ex["labels"]).mean(1))
  want = np.sort(np.argsort(-score, kind="stable")[:5])
  np.testing.assert_array_equal(src.selection.indices, want)
  np.testing.assert_allclose(src.selection.scores, score, atol=1e-5)
  batch = next(src)
  kept = {tuple(r) for r in ex["tokens"][want]}
  assert all(tuple(r) in kept for r in batch["tokens"])
  state = src.get_state()
  second = next(src)
  src.set_state(state)
  np.testing.assert_array_equal(next(src)["tokens"], second["tokens"])
  with pytest.raises(ValueError, match="select_reference"):
    miniplm.SelectedSource(ArraySource(ex, 2, **one_process()), reference="")
  with pytest.raises(ValueError, match="fewer than a batch"):
    big = miniplm.SelectedSource(ArraySource(ex, 8, **one_process()),
                                   reference=(nets["ref"], CONFIG), fraction=0.1)
    big.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG,
                   student_config=CONFIG)


def ddk_source(n_domains=2, **kw):
  train = {f"d{i}": ArraySource(synthetic_lm_examples(8, 8, CONFIG.vocab_size, seed=i,
                                                      branching=2 + i), 4, seed=0,
                                **one_process()) for i in range(n_domains)}
  evals = {f"d{i}": synthetic_lm_examples(3, 8, CONFIG.vocab_size, seed=100 + i)
           for i in range(n_domains)}
  return ddk.DDKSource(train, evals, batch_size=4, seed=5, alpha=0.5, floor=0.2,
                             **one_process(), **kw), evals


def test_ddk_weights_follow_the_smoothed_gap_and_resume(nets):
  src, evals = ddk_source()
  src.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)

  def nll(params, ex):
    return -np_token_logprobs(params, ex["tokens"], ex["labels"]).mean()

  smoothed = None
  for student in (nets["student"], nets["ref"]):
    got = src.update_weights(student)
    gap = np.array([max(nll(student, evals[d]) - nll(nets["teacher"], evals[d]), 0.0)
                    for d in ("d0", "d1")])
    smoothed = gap if smoothed is None else 0.5 * smoothed + 0.5 * gap
    share = smoothed / smoothed.sum() if smoothed.sum() > 0 else np.full(2, 0.5)
    want = 0.8 * share + 0.2 / 2
    np.testing.assert_allclose([got["d0"], got["d1"]], want, atol=1e-5)
  batch = next(src)
  np.testing.assert_allclose(batch["metric/ddk/weight/d0"], got["d0"], rtol=1e-6)
  state = json.loads(json.dumps(src.get_state()))
  following = [next(src) for _ in range(3)]
  fresh, _ = ddk_source()
  fresh.set_state(state)
  assert fresh.weights.as_dict() == pytest.approx(got)
  for want_batch in following:
    got_batch = next(fresh)
    for k in want_batch:
      np.testing.assert_array_equal(got_batch[k], want_batch[k])
  with pytest.raises(ValueError, match="bind_models"):
    ddk_source()[0].update_weights(None)


def test_split_by_domain_names_the_bad_line(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_text('{"text": "a", "domain": "x"}\n{"text": "b", "domain": "y"}\n'
                  '{"text": "c", "domain": "x"}\n{"text": "d"}\n')
  with pytest.raises(ValueError, match=r"mixed.jsonl:4: DDK needs a non-empty 'domain'"):
    ddk.split_by_domain([str(path)], str(tmp_path / "out"))
  path.write_text('{"text": "a", "domain": "x"}\n{"text": "b", "domain": "y"}\n'
                  '{"text": "c", "domain": "x"}\n')
  out = ddk.split_by_domain([str(path)], str(tmp_path / "out"))
  assert list(out) == ["x", "y"]
  assert [json.loads(l)["text"] for l in open(out["x"])] == ["a", "c"]


@pytest.mark.parametrize("name", ["miniplm", "ddk"])
def test_cpu_variant_trains(name, tmp_path):
  cfg = load_config(name, "cpu")
  with cfg.unlocked():
    cfg.train.progress_bar = False
    cfg.checkpoint.async_save = False
  workdir = str(tmp_path / "run")
  result = loop.train(cfg, workdir)
  assert result["status"] == "done" and result["step"] == 4
  metrics = read_metrics(workdir)
  assert len([m for m in metrics if "loss/total" in m]) == 4
  if name == "ddk":
    rows = [m for m in metrics if "ddk/weight/d0" in m]
    assert [m["step"] for m in rows] == [1, 2, 3, 4]  # Every batch carries the weights.
    for m in rows:
      assert math.isclose(sum(m[f"ddk/weight/d{i}"] for i in range(3)), 1.0, rel_tol=1e-5)
    # The engine called the source's after_eval hook at both evaluations (steps 2 and 4): the
    # checkpointed data state counts two weight updates. (The tiny student is already no worse
    # than its teacher on each domain, so the smoothed gaps are 0 and the weights stay uniform.)
    with open(os.path.join(workdir, "checkpoints", "4", "data", "metadata")) as f:
      weights = json.load(f)["weights"]
    assert weights["updates"] == 2 and len(weights["smoothed"]) == 3
    # Resuming keeps the weights: the data state holds them.
    with cfg.unlocked():
      cfg.train.steps = 6
    loop.train(cfg, workdir, allow_config_change=["train.steps"])
    assert len([m for m in read_metrics(workdir) if "loss/total" in m]) == 6
