"""Several teachers (jkd.train.teachers, docs/methods.md §13): the routed mixture, the gate, the
routing in the step, the errors, and configs/multi_teacher.py's claim.

References: float64 NumPy from the formulas of §13: ``log sum_i w_i softmax(z_i)`` (a smaller
vocabulary padded with probability 0), the gate ``softmax(W^T mean_t h + c)``, its loss
``mean_{b,t} -log sum_i w_bi p_i(y_bt)`` and analytic gradient, MST-Distill's balance
``KL(u || mean_b w_b)``, the token-weighted shares. The 8-device case (two teachers of different
shapes in their own shardings, mixed by a gate) is in tests/multidevice_train.py.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jkd import losses
from jkd import models
from jkd.data import ArraySource, selection, synthetic_lm_examples
from jkd.train import default_config, loop, recipes, setup as setup_lib, stages
from jkd.train import step as step_lib
from jkd.train import teachers
from jkd.train.config import add_sections
from jkd.train.sources import ddk, onpolicy
from jkd.train.writer import read_metrics
from recipe_configs import load_module


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(np.where(np.isfinite(z), z, -np.inf), axis=-1, keepdims=True)
  e = np.exp(z - m)
  with np.errstate(divide="ignore"):
    return np.log(e / e.sum(-1, keepdims=True))


def np_mixture(logits, w):
  """``log sum_i w_bi softmax(z_i)`` ``[B, T, V]``, smaller vocabularies padded with p = 0."""
  vocab = max(z.shape[-1] for z in logits)
  p = 0.0
  for i, z in enumerate(logits):
    pi = np.exp(np_log_softmax(z))
    pi = np.concatenate([pi, np.zeros(pi.shape[:-1] + (vocab - pi.shape[-1],))], -1)
    p = p + np.asarray(w, np.float64)[:, i, None, None] * pi
  with np.errstate(divide="ignore"):
    return np.log(p)


def np_gate(kernel, bias, hidden, mask, lp, balance):
  """Weights, gate loss and its analytic gradient wrt (kernel, bias), in float64."""
  m = mask.astype(np.float64)
  feats = np.einsum("bth,bt->bh", hidden, m) / np.maximum(m.sum(1), 1)[:, None]
  a = feats @ kernel + bias
  w = np.exp(a - a.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  p = np.exp(lp)                                      # [B, T, N]
  mix = np.einsum("bn,btn->bt", w, p)
  count = m.sum()
  loss = -(np.log(mix) * m).sum() / count
  g = -np.einsum("btn,bt->bn", p, m / mix) / count    # dL/dw
  mean = w.mean(0)
  n = w.shape[1]
  loss += balance * np.sum((np.log(1.0 / n) - np.log(mean)) / n)
  g += balance * (-(1.0 / n) / mean / w.shape[0])[None, :]
  da = w * (g - np.sum(w * g, -1, keepdims=True))      # through the softmax
  return w, loss, feats.T @ da, da.sum(0)


def test_mixture_matches_numpy_and_field_routing_is_the_routed_teacher(rng):
  b, t = 3, 4
  logits = [rng.normal(size=(b, t, 7)) * 3, rng.normal(size=(b, t, 7)),
            rng.normal(size=(b, t, 5))]
  logits[0][0, 0, 2] = -np.inf   # A banned token of one teacher.
  w = np.array([[0.2, 0.5, 0.3], [0.0, 0.0, 1.0], [0.6, 0.0, 0.4]])
  got = jax.jit(teachers.mixture_logprobs)([jnp.asarray(z, jnp.float32) for z in logits],
                                           jnp.asarray(w))
  want = np_mixture(logits, w)
  assert got.shape == (b, t, 7) and got.dtype == jnp.float32
  assert np.isneginf(got[1, :, 5:]).all() and np.isneginf(want[1, :, 5:]).all()
  finite = np.isfinite(want)
  np.testing.assert_array_equal(np.isfinite(got), finite)
  np.testing.assert_allclose(np.asarray(got)[finite], want[finite], rtol=1e-5, atol=1e-5)
  # One-hot weights (field routing): exactly the routed teacher's log-softmax.
  ids = np.array([2, 0, 1])
  onehot = teachers.route(teachers.Routing("field", 3), {"domain": jnp.asarray(ids)}, rows=b)
  routed = teachers.mixture_logprobs([jnp.asarray(z[:, :, :5], jnp.float32) for z in logits],
                                     onehot)
  for row, i in enumerate(ids):
    np.testing.assert_array_equal(
        routed[row], jax.nn.log_softmax(jnp.asarray(logits[i][row, :, :5], jnp.float32)))
  fixed = teachers.route(teachers.Routing("fixed", 3, weights=(0.5, 0.25, 0.25)), {}, rows=2)
  np.testing.assert_array_equal(fixed, [[0.5, 0.25, 0.25]] * 2)


def test_gate_pieces_match_numpy(rng):
  b, t, h, n = 4, 5, 6, 3
  hidden = rng.normal(size=(b, t, h))
  mask = rng.random((b, t)) < 0.7
  mask[0] = False                                     # A row without counted tokens.
  kernel, bias = rng.normal(size=(h, n)), rng.normal(size=(n,))
  labels = rng.integers(0, 9, size=(b, t))
  logits = [rng.normal(size=(b, t, 9)) for _ in range(n)]
  lp = np.stack([np.take_along_axis(np_log_softmax(z), labels[..., None], -1)[..., 0]
                 for z in logits], -1)
  feats = teachers.pooled_features(jnp.asarray(hidden, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(feats[0], 0.0)
  w = teachers.gate_weights({"kernel": jnp.asarray(kernel, jnp.float32),
                             "bias": jnp.asarray(bias, jnp.float32)}, feats)
  got_lp = teachers.label_logprobs([jnp.asarray(z, jnp.float32) for z in logits],
                                   jnp.asarray(labels), jnp.asarray(mask))
  want_w, want_loss, _, _ = np_gate(kernel, bias, hidden, mask, lp, balance=0.0)
  np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_lp, np.where(mask[..., None], lp, 0.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(teachers.gate_nll(w, got_lp, jnp.asarray(mask)), want_loss,
                             rtol=1e-5)
  mean = want_w.mean(0)
  np.testing.assert_allclose(teachers.balance_loss(w),
                             np.sum((np.log(1 / n) - np.log(mean)) / n), rtol=1e-4, atol=1e-7)
  counts = mask.sum(1)
  np.testing.assert_allclose(teachers.shares(w, jnp.asarray(mask)),
                             want_w.T @ counts / counts.sum(), rtol=1e-5)
  assert float(teachers.balance_loss(jnp.full((3, n), 1.0 / n))) == pytest.approx(0.0, abs=1e-7)


def test_gate_gradient_matches_the_analytic_gradient(x64, rng):
  b, t, h, n = 5, 4, 3, 2
  hidden, mask = rng.normal(size=(b, t, h)), rng.random((b, t)) < 0.8
  lp = np.log(rng.dirichlet(np.ones(4), size=(b, t))[..., :n])
  kernel, bias = rng.normal(size=(h, n)), rng.normal(size=(n,))

  def loss(params):
    feats = teachers.pooled_features(jnp.asarray(hidden), jnp.asarray(mask))
    w = teachers.gate_weights(params, feats)
    return (teachers.gate_nll(w, jnp.asarray(lp), jnp.asarray(mask))
            + 0.3 * teachers.balance_loss(w))

  value, grads = jax.jit(jax.value_and_grad(loss))({"kernel": jnp.asarray(kernel),
                                                    "bias": jnp.asarray(bias)})
  _, want, d_kernel, d_bias = np_gate(kernel, bias, hidden, mask, lp, balance=0.3)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(grads["kernel"], d_kernel, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["bias"], d_bias, rtol=1e-4, atol=1e-6)


def test_a_gate_fitted_to_the_labels_routes_to_the_specialist(rng):
  """Domain d's labels are likely under teacher d only; the features show the domain through
  noise: fitting the gate by its loss alone routes (almost) every example to its specialist."""
  b, t, h = 64, 6, 4
  domain = rng.integers(0, 2, size=b)
  hidden = rng.normal(size=(b, t, h)) + 2.0 * (2 * domain - 1)[:, None, None] * np.eye(h)[0]
  good, bad = np.log(0.5), np.log(0.01)
  lp = np.where(np.arange(2)[None, None, :] == domain[:, None, None], good, bad)
  mask = jnp.ones((b, t), bool)
  feats = teachers.pooled_features(jnp.asarray(hidden, jnp.float32), mask)
  params = teachers.init_gate(h, 2)
  opt = optax.adam(0.1)
  state = opt.init(params)
  grad = jax.jit(jax.grad(lambda p: teachers.gate_nll(teachers.gate_weights(p, feats),
                                                      jnp.asarray(lp, jnp.float32), mask)))
  for _ in range(60):
    updates, state = opt.update(grad(params), state)
    params = optax.apply_updates(params, updates)
  w = np.asarray(teachers.gate_weights(params, feats))
  assert w[np.arange(b), domain].mean() > 0.9


def _tiny(seed, **kw):
  config = models.ModelConfig(**{**dict(vocab_size=32, hidden_size=16, intermediate_size=32,
                                        num_layers=2, num_heads=2, num_kv_heads=1), **kw})
  return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(seed))


def _batch(rows=4, seq=6, domain=(0, 1, 0, 1)):
  toks = np.asarray(jax.random.randint(jax.random.key(7), (rows, seq), 0, 32), np.int32)
  labels = np.roll(toks, -1, 1)
  labels[:, -1] = -100
  return {"tokens": toks, "labels": labels, "domain": np.asarray(domain, np.int32)}


def test_field_routing_teaches_each_row_with_its_teacher():
  """The step's inputs: the KD term equals the token mean of each row's forward KL to its
  routed teacher, and the shares count the rows' tokens."""
  (scfg, sparams), t0, t1 = _tiny(0, num_layers=1), _tiny(1), _tiny(2, intermediate_size=48)
  objective = losses.build_objective({"kd": {"term": "forward_kl"}})
  routing = teachers.Routing("field", 2)
  batch = _batch(domain=(1, 1, 0, 1))

  @jax.jit
  def run(params, tparams):
    inputs, _ = step_lib.model_inputs(params, tparams, batch, student_config=scfg,
                                      teacher_config=(t0[0], t1[0]), objective=objective,
                                      routing=routing)
    _, metrics = objective(inputs)
    metrics.update(teachers.routing_loss(inputs, routing, losses.token_mask(inputs))[1])
    zt = [models.apply(p, batch["tokens"], config=c).logits for p, c in zip(tparams,
                                                                            (t0[0], t1[0]))]
    return metrics, inputs["student_logits"], zt

  metrics, zs, zt = run(sparams, (t0[1], t1[1]))
  routed = jnp.stack([zt[d][r] for r, d in enumerate(batch["domain"])])
  mask = batch["labels"] != -100
  want = losses.masked_mean(losses.forward_kl(zs, routed, where=mask), mask)
  np.testing.assert_allclose(metrics["loss/kd"], want, rtol=1e-5)
  assert float(metrics["teachers/share/0"]) == 0.25 and float(metrics["teachers/share/1"]) == 0.75


def test_the_gate_learns_from_its_loss_alone_and_the_student_from_the_mixture():
  """Stop-gradients: the divergence does not reach the gate, the gate's loss not the student."""
  (scfg, sparams), t0, t1 = _tiny(0, num_layers=1), _tiny(1), _tiny(2)
  objective = losses.build_objective({"kd": {"term": "forward_kl"}, "cross_entropy": 0.1})
  routing = teachers.Routing("gate", 2, balance=0.5)
  gate = {"kernel": jax.random.normal(jax.random.key(3), (16, 2)), "bias": jnp.zeros(2)}
  batch = {k: v for k, v in _batch().items() if k != "domain"}

  def parts(params, gate):
    inputs, _ = step_lib.model_inputs(params, (t0[1], t1[1]), batch, student_config=scfg,
                                      teacher_config=(t0[0], t1[0]), objective=objective,
                                      routing=routing, gate_params=gate)
    return (objective(inputs)[0],
            teachers.routing_loss(inputs, routing, losses.token_mask(inputs))[0])

  grads = jax.jit(lambda p, g: (jax.grad(lambda g: parts(p, g)[0])(g),      # KD -> gate
                                 jax.grad(lambda p: parts(p, g)[1])(p),      # gate -> student
                                 jax.grad(lambda g: parts(p, g)[1])(g)))(sparams, gate)
  kd_to_gate, gate_to_student, gate_to_gate = grads
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(kd_to_gate))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(gate_to_student))
  assert float(jnp.abs(gate_to_gate["kernel"]).max()) > 0


def _cfg(routing="field", specs="random", objective=None, **teachers_kw):
  c = default_config()
  recipes.cpu_variant(c, steps=2)
  c.objective = objective or {"kd": {"term": "forward_kl"}}
  add_sections(c, "teachers")
  c.teachers.update(dict(specs=specs, routing=routing, **teachers_kw))
  return c


@pytest.mark.parametrize("changes,match", [
    (dict(specs=""), "teachers.specs is empty"),
    (dict(specs="hf:/a,,hf:/b"), "empty entry"),
    (dict(routing="vote"), "teachers.routing must be one of"),
    (dict(weights="1,1"), "teachers.weights is for teachers.routing='fixed'"),
    (dict(routing="fixed", weights="1,2,3"), "3 entries for 2 teachers"),
    (dict(routing="fixed", weights="1,-1"), "must be finite, >= 0"),
    (dict(balance=0.1), "teachers.balance"),
    (dict(dtypes="float32,float32"), "teachers.dtypes lists 2 entries"),
    (dict(param_dtypes="float8"), "unknown dtype 'float8'"),
    (dict(field=""), "needs teachers.field"),
])
def test_bad_teachers_configs(changes, match):
  c = _cfg()
  c.teachers.update(changes)
  with pytest.raises(ValueError, match=match):
    setup_lib.setup(c)


def test_several_teachers_need_one_vocabulary_unless_uld_and_terms_on_logits():
  other = 'random:{"vocab_size": 120, "hidden_size": 32, "intermediate_size": 64, ' \
          '"num_layers": 2, "num_heads": 4, "num_kv_heads": 2}'
  with pytest.raises(ValueError, match=r"vocabularies \[128, 120\].*must all equal the"
                                       r" student's \(128\).*`uld`"):
    setup_lib.setup(_cfg(specs=other))
  uld = {"uld": {"term": "uld"}}
  run = setup_lib.setup(_cfg(specs=other, objective=uld))   # One teacher per example: fine.
  assert [c.vocab_size for c in run.step_teacher_config] == [128, 120]
  with pytest.raises(ValueError, match="cannot be mixed with weights"):
    setup_lib.setup(_cfg(specs=other, objective=uld, routing="fixed"))
  with pytest.raises(ValueError, match="fused=True"):
    setup_lib.setup(_cfg(objective={"kd": {"term": "forward_kl", "fused": True}}))
  with pytest.raises(ValueError, match="one teacher's features"):
    setup_lib.setup(_cfg(objective={"h": {"term": "hidden_state"}}))
  c = _cfg()
  c.teacher.online = False
  with pytest.raises(ValueError, match="teacher.online=True"):
    setup_lib.setup(c)


def test_a_routing_field_missing_from_the_data_is_an_error_before_the_workdir(tmp_path):
  c = _cfg()
  ex = synthetic_lm_examples(8, 16, 128, seed=0)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"by its 'domain' field, but the training data has no"
                                       r" such field.*data.source='domains'"):
    loop.train(c, str(workdir), train_source=ArraySource(ex, 4, process_index=0,
                                                         process_count=1))
  assert not workdir.exists()
  routing = teachers.Routing("field", 2)
  with pytest.raises(ValueError, match=r"holds 2, outside \[0, 2\)"):
    teachers.check_batch({**ex, "domain": np.full(8, 2, np.int32)}, routing)
  with pytest.raises(ValueError, match=r"must be an integer \[batch\] array"):
    teachers.check_batch({**ex, "domain": np.zeros((8, 16), np.int32)}, routing)


def test_domains_carry_their_teacher_index_and_on_policy_keeps_it():
  c = default_config()
  recipes.cpu_variant(c)
  c.data.update(dict(source="domains", num_examples=8, eval_examples=4))
  add_sections(c, "ddk", "teachers")
  c.ddk.num_domains = 2
  c.teachers.domains = "d1,d0"
  train, evals = ddk.domain_sources(c, 128)
  batch = next(train)
  examples, _ = ddk.synthetic_domain_examples(c, 128)
  d1_rows = {tuple(r) for r in examples["d1"]["tokens"]}
  assert {int(d) for d in batch["domain"]} <= {0, 1}
  for row, d in zip(batch["tokens"], batch["domain"]):
    assert (tuple(row) in d1_rows) == (d == 0)        # d1 is teacher 0.
  assert next(evals.one_epoch())["domain"].dtype == np.int32
  c.teachers.domains = "d0,d2"
  with pytest.raises(ValueError, match="must name every domain of the data once"):
    ddk.domain_sources(c, 128)
  # On-policy sources keep [B] fields with their row (and replay them); [B, T] extras stay errors.
  onpolicy._check_batch({"tokens": np.zeros((2, 3)), "labels": np.zeros((2, 3)),
                         "domain": np.zeros(2, np.int32)})
  with pytest.raises(ValueError, match="would no longer match"):
    onpolicy._check_batch({"tokens": np.zeros((2, 3)), "labels": np.zeros((2, 3)),
                           "positions": np.zeros((2, 3))})
  buffer = onpolicy.ReplayBuffer(4)
  buffer.add({"tokens": np.ones((2, 3), np.int32), "domain": np.array([1, 0], np.int32)})
  again = onpolicy.ReplayBuffer(4)
  again.set_state(buffer.get_state())
  np.testing.assert_array_equal(again.take([1, 0])["domain"], [0, 1])


def test_the_routed_student_beats_the_single_teacher_student_on_each_domain(tmp_path):
  """configs/multi_teacher.py: its CPU variants end to end. The student taught by the two
  domain specialists (``cpu``) has a lower held-out NLL on each domain than the same student
  (same init, steps and data) taught by one teacher of the same size and training steps
  trained on both domains (``cpu_single``)."""
  module = load_module("multi_teacher")
  nll, evals = {}, {}
  for variant in module.CPU_VARIANTS:
    c = module.get_config(variant)
    recipes.apply_overrides(c, module.make_cpu_data(str(tmp_path / "teachers"), variant))
    c.lock()
    result = stages.run(c, str(tmp_path / variant))
    assert result["status"] == "done" and result["step"] == c.train.steps
    run = setup_lib.setup(c)
    _, examples = ddk.synthetic_domain_examples(c, run.student_config.vocab_size)
    nll[variant] = {d: selection.mean_token_nll(result["state"].params, run.student_config, ex)
                    for d, ex in examples.items()}
    evals[variant] = result["eval"]
    lines = [m for m in read_metrics(str(tmp_path / variant)) if "loss/total" in m]
    assert lines and all(math.isfinite(m["loss/total"]) for m in lines)
    if variant == "cpu":
      for m in lines:   # Routing logged every step: each batch's shares sum to 1.
        assert m["teachers/share/0"] + m["teachers/share/1"] == pytest.approx(1.0)
  print("held-out NLL per domain:", nll)
  for d in ("d0", "d1"):
    assert nll["cpu"][d] < nll["cpu_single"][d] - 0.1, (d, nll)
  # The routed teacher's eval metrics: each specialist's NLL on the whole eval set, the shares
  # (equal domains), and the mixture = each domain's own specialist.
  got = evals["cpu"]
  teacher_nll = {}
  for i, name in enumerate(("d0", "d1")):
    config, params = models.load_hf(str(tmp_path / "teachers" / f"teacher_{name}"))
    teacher_nll[name] = {d: selection.mean_token_nll(params, config, ex)
                         for d, ex in examples.items()}
    both = {k: np.concatenate([ex[k] for ex in examples.values()]) for k in examples["d0"]}
    np.testing.assert_allclose(got[f"eval/teachers/nll/{i}"],
                               selection.mean_token_nll(params, config, both), rtol=1e-4)
    assert got[f"eval/teachers/share/{i}"] == pytest.approx(0.5)
    assert teacher_nll[name][name] < min(v for d, v in teacher_nll[name].items() if d != name)
  np.testing.assert_allclose(got["eval/teacher_nll"],
                             (teacher_nll["d0"]["d0"] + teacher_nll["d1"]["d1"]) / 2, rtol=1e-4)
  assert "eval/teachers/nll/0" not in evals["cpu_single"]
  assert os.path.exists(tmp_path / "cpu" / "config.json")
