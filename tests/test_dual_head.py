"""Dual-head distillation (jkd.losses.dual_head, jkd.export) against the float64 NumPy
reference of docs/methods.md §14 (tests/reference_dual_head.py).

* The ``dual_head`` term: values (full, sparse and fused teachers), its parameters from shapes,
  and the gradients: the KD loss reaches the aux head's ``Delta`` and the backbone and never the
  main head; cross-entropy reaches the main head and the backbone and never ``Delta``.
* Inference: the probability mixture, and the gap to the logit-level merge (a geometric mixture).
* Export: drop and merge through save_hf/load_hf (tied and untied heads), the CLI on a tiny run
  (its checkpoint left byte for byte as it was), and the errors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
import reference_dual_head as dref
from jkd import export as export_lib
from jkd import losses
from jkd import models
from jkd.losses import dual_head
from jkd.train import stages
from jkd.train import step as step_lib
from jkd.train.writer import read_metrics
from recipe_configs import load_config

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

B, T, H, V = 2, 5, 8, 16


@pytest.fixture(scope="module")
def tiny():
  """``(untied config, its params)`` of a tiny model, made once (the tied model's params are
  the same without ``lm_head``)."""
  config = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                              num_layers=1, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=32, tie_embeddings=False)
  return config, jit(functools.partial(models.init_params, config))(jax.random.key(0))


def _data(rng, dtype=np.float32):
  labels = rng.integers(0, V, (B, T))
  labels[0, :2] = -100
  return dict(hidden=rng.normal(size=(B, T, H)).astype(dtype),
              main=(0.5 * rng.normal(size=(H, V))).astype(dtype),
              own=(0.3 * rng.normal(size=(H, V))).astype(dtype),
              teacher=(2.0 * rng.normal(size=(B, T, V))).astype(dtype),
              labels=labels, where=np.array([[True] * T, [True] * (T - 1) + [False]]))


def _inputs(d, **extra):
  return {"student_hidden": jnp.asarray(d["hidden"]), "student_head": jnp.asarray(d["main"]),
          "labels": jnp.asarray(d["labels"]), "where": jnp.asarray(d["where"]), **extra}


def _params(d, head="delta", name="dual_head"):
  return {name: {dual_head.HEADS[head]: jnp.asarray(d["own"])}}


CASES = {
    "forward_kl_T2_delta": dict(divergence="forward_kl", temperature=2.0, head="delta"),
    "reverse_kl_T05_delta": dict(divergence="reverse_kl", temperature=0.5, head="delta"),
    "gjsd_separate": dict(divergence="generalized_jsd", temperature=1.0, head="separate",
                          beta=0.3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_term_matches_reference(case, rng):
  opts = CASES[case]
  d = _data(rng)
  objective = losses.build_objective({"dual_head": {"weight": 1.0, **opts}})
  inputs = _inputs(d, teacher_logits=jnp.asarray(d["teacher"]))
  total, metrics = jit(lambda i, p: objective(i, None, p))(inputs, _params(d, opts["head"]))
  options = {k: v for k, v in opts.items() if k not in ("divergence", "temperature", "head")}
  want = dref.kd_loss(d["hidden"], d["main"], d["own"], head=opts["head"],
                      divergence=opts["divergence"], temperature=opts["temperature"],
                      teacher_logits=d["teacher"], labels=d["labels"], where=d["where"],
                      **options)
  np.testing.assert_allclose(metrics["loss/dual_head"], want, rtol=2e-5)
  np.testing.assert_allclose(total, want, rtol=2e-5)
  np.testing.assert_allclose(metrics["dual_head/aux_rms"],
                             np.sqrt(np.mean(np.square(d["own"], dtype=np.float64))), rtol=1e-5)


def test_sparse_teacher_matches_reference(rng):
  d = _data(rng)
  ids, logprobs = ref.topk(d["teacher"], 5)
  objective = losses.build_objective({"dual_head": {"temperature": 2.0}})
  inputs = _inputs(d, teacher_topk_ids=jnp.asarray(ids, jnp.int32),
                   teacher_topk_logprobs=jnp.asarray(logprobs, jnp.float32))
  _, metrics = jit(lambda i, p: objective(i, None, p))(inputs, _params(d))
  want = dref.kd_loss(d["hidden"], d["main"], d["own"], temperature=2.0, teacher_ids=ids,
                      teacher_logprobs=logprobs, labels=d["labels"], where=d["where"])
  np.testing.assert_allclose(metrics["loss/dual_head"], want, rtol=2e-5)


def test_params_from_shapes_start_the_aux_head_at_the_main_head(rng):
  d = _data(rng)
  inputs = _inputs(d, teacher_logits=jnp.asarray(d["teacher"]))
  delta = losses.build_objective({"dual_head": {}})
  params = delta.init_params(jax.random.key(0), jax.eval_shape(lambda: inputs))
  assert list(params) == ["dual_head"] and list(params["dual_head"]) == ["aux_delta"]
  assert params["dual_head"]["aux_delta"].shape == (H, V)
  assert not np.any(np.asarray(params["dual_head"]["aux_delta"]))
  # At step 0 the aux head is the main head: the term is plain KD on the main head's logits.
  _, m = delta(inputs, None, params)
  _, plain = losses.build_objective({"forward_kl": 1.0})(
      {**inputs, "student_logits": jnp.asarray(d["hidden"]) @ jnp.asarray(d["main"])})
  np.testing.assert_allclose(m["loss/dual_head"], plain["loss/forward_kl"], rtol=1e-6)
  # A separate head starts at zero: the uniform distribution.
  sep = losses.build_objective({"dual_head": {"head": "separate"}})
  sparams = sep.init_params(jax.random.key(0), inputs)
  assert list(sparams["dual_head"]) == ["aux_head"]
  _, m = sep(inputs, None, sparams)
  want = dref.kd_loss(d["hidden"], d["main"], np.zeros((H, V)), head="separate",
                      teacher_logits=d["teacher"], labels=d["labels"], where=d["where"])
  np.testing.assert_allclose(m["loss/dual_head"], want, rtol=1e-5)


def test_fused_equals_unfused_in_values_and_gradients(rng):
  d = _data(rng)
  th = rng.normal(size=(B, T, 6)).astype(np.float32)
  tw = rng.normal(size=(6, V)).astype(np.float32)
  opts = dict(divergence="forward_kl", temperature=2.0)
  unfused = losses.build_objective({"dual_head": opts})
  fused = losses.build_objective({"dual_head": {**opts, "fused": True, "chunk_size": 4}})
  base = _inputs(d)

  def loss(objective, teacher, hidden, main, own):
    inputs = {**base, **teacher, "student_hidden": hidden, "student_head": main}
    return objective(inputs, None, {"dual_head": {"aux_delta": own}})[0]

  args = (jnp.asarray(d["hidden"]), jnp.asarray(d["main"]), jnp.asarray(d["own"]))
  grad = lambda obj, teacher: jit(jax.value_and_grad(  # noqa: E731
      functools.partial(loss, obj, teacher), argnums=(0, 1, 2)))(*args)
  v1, g1 = grad(unfused, {"teacher_logits": jnp.asarray(th @ tw)})
  v2, g2 = grad(fused, {"teacher_hidden": jnp.asarray(th), "teacher_head": jnp.asarray(tw)})
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(g1[1])) and not np.any(np.asarray(g2[1]))  # main head: none
  assert np.abs(np.asarray(g2[2])).max() > 1e-4


def test_gradients_reach_only_their_own_head(rng, x64):
  """0.5 CE + 0.5 KD on a toy backbone ``h = tanh(x B)``: the main head ``W`` gets exactly half
  the CE gradient, ``Delta`` exactly half the KD gradient, the backbone both; each checked
  against central finite differences of the float64 NumPy references."""
  x = rng.normal(size=(B, T, 4))
  bb = 0.7 * rng.normal(size=(4, H))
  d = _data(rng, np.float64)
  objective = losses.build_objective({
      "ce": {"term": "cross_entropy", "weight": 0.5},
      "dual_head": {"weight": 0.5, "temperature": 2.0}})

  def total(bb_, w, own):
    h = jnp.tanh(jnp.asarray(x) @ bb_)
    inputs = {"student_hidden": h, "student_head": w, "student_logits": h @ w,
              "teacher_logits": jnp.asarray(d["teacher"]), "labels": jnp.asarray(d["labels"]),
              "where": jnp.asarray(d["where"])}
    return objective(inputs, None, {"dual_head": {"aux_delta": own}})

  args = tuple(jnp.asarray(a) for a in (bb, d["main"], d["own"]))
  grads, metrics = jit(jax.grad(lambda *a: total(*a), argnums=(0, 1, 2), has_aux=True))(*args)
  g_bb, g_w, g_own = (np.asarray(g) for g in grads)
  assert g_w.dtype == np.float64

  def np_kd(bb_, w, own):
    return dref.kd_loss(np.tanh(x @ bb_), w, own, temperature=2.0, teacher_logits=d["teacher"],
                        labels=d["labels"], where=d["where"])

  def np_ce(bb_, w, own):
    del own
    mask = (d["labels"] != -100) & d["where"]
    return ref.masked_mean(ref.cross_entropy(np.tanh(x @ bb_) @ w, d["labels"]), mask)

  # (The objective reports its values in float32; the gradients stay float64.)
  np.testing.assert_allclose(metrics["loss/dual_head"], np_kd(bb, d["main"], d["own"]),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/ce"], np_ce(bb, d["main"], d["own"]), rtol=1e-6)

  def directional(fn, which, u, eps=1e-6):
    point = [bb, d["main"], d["own"]]
    plus, minus = list(point), list(point)
    plus[which], minus[which] = point[which] + eps * u, point[which] - eps * u
    return (fn(*plus) - fn(*minus)) / (2 * eps)

  u = [rng.normal(size=a.shape) for a in (bb, d["main"], d["own"])]
  # Delta: the KD loss's gradient only (CE does not read it).
  np.testing.assert_allclose(np.sum(g_own * u[2]), 0.5 * directional(np_kd, 2, u[2]),
                             rtol=1e-6)
  # W: the CE loss's gradient only; the KD loss's (nonzero in value: A = W + Delta) is stopped.
  np.testing.assert_allclose(np.sum(g_w * u[1]), 0.5 * directional(np_ce, 1, u[1]), rtol=1e-6)
  assert abs(directional(np_kd, 1, u[1])) > 1e-3  # what a missing stop-gradient would add
  # The backbone: both.
  both = 0.5 * (directional(np_kd, 0, u[0]) + directional(np_ce, 0, u[0]))
  np.testing.assert_allclose(np.sum(g_bb * u[0]), both, rtol=1e-6)
  assert abs(directional(np_kd, 0, u[0])) > 1e-3 and abs(directional(np_ce, 0, u[0])) > 1e-3


def test_in_the_engine_the_kd_gradient_skips_an_untied_main_head(tiny):
  config, params = tiny
  teacher = jax.tree.map(lambda x: 1.5 * x, params)
  objective = losses.build_objective({"dual_head": {"temperature": 2.0}})
  term = step_lib.init_term_params(objective, jax.random.key(2), params=params,
                                   teacher_params=teacher, student_config=config,
                                   teacher_config=config)
  assert term["dual_head"]["aux_delta"].shape == (32, 128)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 128)
  batch = {"tokens": tokens, "labels": tokens}

  def loss(p, tp):
    inputs, _ = step_lib.model_inputs(p, teacher, batch, student_config=config,
                                      teacher_config=config, objective=objective)
    return objective(inputs, None, tp)[0]

  g, gt = jit(jax.grad(loss, argnums=(0, 1)))(params, term)
  assert not np.any(np.asarray(g["lm_head"]))
  assert np.abs(np.asarray(g["final_norm"]["scale"])).max() > 0
  assert np.abs(np.asarray(g["embed"]["embedding"])).max() > 0
  assert np.abs(np.asarray(gt["dual_head"]["aux_delta"])).max() > 0


MIXING = [(0.0, 1.0), (0.3, 0.5), (0.5, 1.0), (0.8, 4.0), (1.0, 2.0)]


@pytest.mark.parametrize("alpha,beta", MIXING)
def test_mixture_matches_reference(alpha, beta, rng):
  d = _data(rng)
  aux = d["main"] + d["own"]
  got = jit(functools.partial(dual_head.dual_head_logprobs, alpha=alpha, beta=beta))(
      d["hidden"], d["main"], aux)
  assert got.dtype == jnp.float32 and got.shape == (B, T, V)
  np.testing.assert_allclose(got, dref.mixture_logprobs(d["hidden"], d["main"], aux,
                                                        alpha=alpha, beta=beta), atol=2e-6)
  np.testing.assert_allclose(jax.nn.logsumexp(got, axis=-1), 0.0, atol=1e-6)
  # bf16 inputs are computed in float32.
  low = dual_head.dual_head_logprobs(*(jnp.asarray(a, jnp.bfloat16) for a in (
      d["hidden"], d["main"], aux)), alpha=alpha, beta=beta)
  assert low.dtype == jnp.float32


def test_logit_merge_is_a_geometric_mixture_and_its_gap(rng):
  d = _data(rng)
  aux = d["main"] + 3.0 * d["own"]
  for alpha, beta in MIXING:
    head = dual_head.merged_head(d["main"], aux, alpha=alpha, beta=beta)
    geo = np.asarray(jax.nn.log_softmax(jnp.asarray(d["hidden"]) @ head, axis=-1), np.float64)
    np.testing.assert_allclose(geo, dref.merged_logprobs(d["hidden"], d["main"], aux,
                                                         alpha=alpha, beta=beta), atol=1e-5)
    arith = dref.mixture_logprobs(d["hidden"], d["main"], aux, alpha=alpha, beta=beta)
    geo64 = dref.merged_logprobs(d["hidden"], d["main"], aux, alpha=alpha, beta=beta)
    gap = ref.kl(geo64, arith)  # KL(merged export || the paper's mixture), per position
    bound = -dref.log_overlap(d["hidden"], d["main"], aux, alpha=alpha, beta=beta)
    assert np.all(gap >= -1e-12) and np.all(gap <= bound + 1e-12)
    if alpha in (0.0, 1.0):
      np.testing.assert_allclose(gap, 0.0, atol=1e-12)
    if (alpha, beta) == (0.5, 1.0):
      # Measured on these heads: the merge is not the mixture (mean KL well above zero).
      assert gap.mean() > 1e-2, gap.mean()
  # Equal heads at beta = 1: merge and mixture coincide.
  same = dref.merged_logprobs(d["hidden"], d["main"], d["main"], alpha=0.4, beta=1.0)
  np.testing.assert_allclose(ref.kl(same, dref.mixture_logprobs(
      d["hidden"], d["main"], d["main"], alpha=0.4, beta=1.0)), 0.0, atol=1e-12)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_export_round_trip_through_save_hf(mode, tied, rng, tmp_path, tiny):
  config, params = tiny
  if tied:
    config = config.replace(tie_embeddings=True)
    params = {k: v for k, v in params.items() if k != "lm_head"}
  main = np.asarray(models.output_head(params, config), np.float64)
  own = 0.05 * rng.normal(size=main.shape)
  term = {"dual_head": {"aux_delta": jnp.asarray(own, jnp.float32)}, "other": jnp.ones(3)}
  alpha, beta = 0.3, 2.0
  out, out_config = dual_head.export_params(params, term, config, mode=mode, alpha=alpha,
                                            beta=beta)
  models.save_hf(str(tmp_path), out, out_config)
  loaded_config, loaded = models.load_hf(str(tmp_path))
  expected = main if mode == "drop" else alpha * main + (1 - alpha) * (main + own) / beta
  assert loaded_config.tie_embeddings == (tied and mode == "drop")
  np.testing.assert_allclose(models.output_head(loaded, loaded_config), expected, atol=1e-6)
  np.testing.assert_array_equal(loaded["embed"]["embedding"], params["embed"]["embedding"])
  # Everything else (the backbone the two heads share) is exported unchanged.
  rest = lambda p: {k: v for k, v in p.items() if k != "lm_head"}  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, rest(loaded), rest(params))


def test_errors(rng):
  d = _data(rng)
  h, w = d["hidden"], d["main"]
  for alpha in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
      dual_head.dual_head_logprobs(h, w, w, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
      dual_head.export_params({}, {}, None, mode="drop", alpha=alpha)
  for beta in (0.0, -1.0):
    with pytest.raises(ValueError, match="beta"):
      dual_head.dual_head_logprobs(h, w, w, beta=beta)
    with pytest.raises(ValueError, match="beta"):
      dual_head.merged_head(w, w, beta=beta)
  with pytest.raises(ValueError, match="unknown dual-head export mode 'mrge'.*'merge'"):
    dual_head.export_params({}, {}, None, mode="mrge")
  with pytest.raises(ValueError, match="needs the dual_head term's parameters"):
    dual_head.export_params({}, {"hidden": jnp.ones(2)}, None, mode="merge")
  two = {"a": {"aux_delta": jnp.ones((H, V))}, "b": {"aux_delta": jnp.ones((H, V))}}
  with pytest.raises(ValueError, match="several dual_head terms"):
    dual_head.export_params({}, two, None, mode="merge")
  with pytest.raises(ValueError, match="aux_head .* must have the same"):
    dual_head.dual_head_logprobs(h, w, w[:, :4])
  with pytest.raises(ValueError, match="main head is"):
    dual_head.aux_head(w, {"aux_delta": jnp.ones((H, 3))})
  with pytest.raises(ValueError, match="not the parameters of a dual_head term"):
    dual_head.aux_head(w, {"delta": w})
  # The term: its options, when the objective is built.
  with pytest.raises(ValueError, match="unknown head 'twin'"):
    losses.build_objective({"dual_head": {"head": "twin"}})
  with pytest.raises(ValueError, match="unknown divergence 'forward_k'.*'forward_kl'"):
    losses.build_objective({"dual_head": {"divergence": "forward_k"}})
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['betta'\]"):
    losses.build_objective({"dual_head": {"divergence": "generalized_jsd", "betta": 0.1}})
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.build_objective({"dual_head": {"temperature": 0.0}})
  # ... and its inputs, when it runs.
  objective = losses.build_objective({"dual_head": {}})
  inputs = _inputs(d, teacher_logits=jnp.asarray(d["teacher"]))
  with pytest.raises(ValueError, match="dual_head has no parameters"):
    objective(inputs)
  fused_batch = _inputs(d, teacher_hidden=jnp.asarray(h), teacher_head=jnp.asarray(w))
  with pytest.raises(ValueError, match="needs the inputs.*give this term fused=True"):
    objective(fused_batch, None, _params(d))


def _digest(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_recipe_trains_and_the_cli_exports_it(tmp_path, capsys):
  cfg = load_config("dual_head", "cpu")
  cfg.lock()
  workdir = str(tmp_path / "run")
  assert stages.run(cfg, workdir)["step"] == cfg.train.steps
  lines = [m for m in read_metrics(workdir) if "loss/total" in m]
  assert [m["step"] for m in lines] == list(range(1, cfg.train.steps + 1))
  for m in lines:
    assert m["train/finite"] == 1.0 and math.isfinite(m["loss/dual_head"])
    np.testing.assert_allclose(m["loss/total"], 0.5 * m["loss/ce"] + 0.5 * m["loss/dual_head"],
                               rtol=1e-5)
  assert lines[0]["dual_head/aux_rms"] == 0.0 and lines[-1]["dual_head/aux_rms"] > 0.0
  before = _digest(os.path.join(workdir, "checkpoints"))
  restored = export_lib.restore_student(workdir)
  assert restored["step"] == cfg.train.steps
  delta = np.asarray(restored["term_params"]["dual_head"]["aux_delta"], np.float64)
  assert delta.shape == (32, 128) and np.abs(delta).max() > 1e-5  # trained from zero
  config, params = restored["config"], restored["params"]
  main = np.asarray(models.output_head(params, config), np.float64)

  outs = {}
  for mode, extra in (("drop", []), ("merge", ["--alpha", "0.25", "--beta", "0.5"])):
    outs[mode] = str(tmp_path / mode)
    manifest = export_lib.main(["--workdir", workdir, "--out", outs[mode], "--dual_head", mode,
                                *extra])
    assert manifest["dual_head"]["mode"] == mode and manifest["tokenizer"] == "saved"
    assert f"exported step {cfg.train.steps}" in capsys.readouterr().out
  rest = lambda p: {k: v for k, v in p.items() if k != "lm_head"}  # noqa: E731
  for mode, head in (("drop", main), ("merge", 0.25 * main + 0.75 * (main + delta) / 0.5)):
    loaded_config, loaded = models.load_hf(outs[mode])
    assert loaded_config.tie_embeddings == (mode == "drop")
    np.testing.assert_allclose(models.output_head(loaded, loaded_config), head, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, rest(loaded), rest(params))
    assert os.path.exists(os.path.join(outs[mode], "tokenizer.json"))
    with open(os.path.join(outs[mode], export_lib.MANIFEST)) as f:
      assert json.load(f)["step"] == cfg.train.steps
  assert _digest(os.path.join(workdir, "checkpoints")) == before  # read only

  # The command itself: its errors exit 2 with one line (checked before any restore).
  result = subprocess.run(
      [sys.executable, "-m", "jkd.export", "--workdir", workdir, "--out", str(tmp_path / "bad"),
       "--dual_head", "merge", "--beta", "0"], capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: beta")
  for out in (os.path.join(workdir, "checkpoints", "x"), workdir):
    with pytest.raises(SystemExit):
      export_lib.main(["--workdir", workdir, "--out", out])
    assert "is the run's workdir or lies inside its checkpoints" in capsys.readouterr().err
