"""jkd.losses.objective: building objectives from dicts, routing to full/sparse/fused forms."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jkd import losses


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_forward_kl(zs, zt):
  lq, lp = _np_log_softmax(zs), _np_log_softmax(zt)
  return (np.exp(lp) * (lp - lq)).sum(-1)


def _np_ce(zs, labels):
  lq = _np_log_softmax(zs)
  safe = np.where(labels < 0, 0, labels)
  return -np.take_along_axis(lq, safe[..., None], -1)[..., 0]


@pytest.fixture
def batch():
  k = jax.random.split(jax.random.key(3), 4)
  b, t, v, h = 2, 5, 13, 6
  hs = jax.random.normal(k[0], (b, t, h))
  ws = jax.random.normal(k[1], (h, v))
  ht = jax.random.normal(k[2], (b, t, h))
  wt = jax.random.normal(k[3], (h, v))
  labels = np.array([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
  where = np.array([[True] * 5, [True, True, False, True, True]])
  return dict(student_hidden=hs, student_head=ws, teacher_hidden=ht, teacher_head=wt,
              student_logits=hs @ ws, teacher_logits=ht @ wt, labels=labels, where=where)


def test_weighted_sum_matches_numpy(batch):
  obj = losses.build_objective({"kd": {"term": "forward_kl", "weight": 0.7},
                                "cross_entropy": 0.3})
  total, metrics = jax.jit(lambda b: obj(b))(batch)
  mask = (batch["labels"] != -100) & batch["where"]
  fkl = _np_forward_kl(batch["student_logits"], batch["teacher_logits"])[mask].mean()
  ce = _np_ce(batch["student_logits"], batch["labels"])[mask].mean()
  np.testing.assert_allclose(metrics["loss/kd"], fkl, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/cross_entropy"], ce, rtol=1e-5)
  np.testing.assert_allclose(total, 0.7 * fkl + 0.3 * ce, rtol=1e-5)
  assert metrics["loss/total"] is total or float(metrics["loss/total"]) == float(total)
  assert obj.names == ("kd", "cross_entropy")


def test_sparse_and_fused_routes_equal_full(batch):
  spec = {"generalized_jsd": {"beta": 0.3, "temperature": 2.0}}
  full = losses.build_objective(spec)
  fused = losses.build_objective({"generalized_jsd": {**spec["generalized_jsd"], "fused": True,
                                                      "chunk_size": 4}})
  v = batch["teacher_logits"].shape[-1]
  order = jnp.argsort(-batch["teacher_logits"], axis=-1)
  sparse_batch = {k: batch[k] for k in ("student_logits", "labels", "where")}
  sparse_batch["teacher_topk_ids"] = order
  sparse_batch["teacher_topk_logprobs"] = jnp.take_along_axis(
      jax.nn.log_softmax(batch["teacher_logits"]), order, -1)
  assert order.shape[-1] == v
  a = full(batch)[0]
  b = full(sparse_batch)[0]
  fused_batch = {k: batch[k] for k in ("student_hidden", "student_head", "teacher_hidden",
                                       "teacher_head", "labels", "where")}
  c = fused(fused_batch)[0]
  np.testing.assert_allclose(b, a, rtol=1e-5)
  np.testing.assert_allclose(c, a, rtol=1e-5)

  def grads(obj, bt):
    def f(hs, ws):
      d = dict(bt, student_hidden=hs, student_head=ws, student_logits=hs @ ws)
      return obj(d)[0]
    return jax.grad(f, argnums=(0, 1))(batch["student_hidden"], batch["student_head"])

  ga, gc = grads(full, batch), grads(fused, fused_batch)
  for x, y in zip(ga, gc):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_taid_state_advances_under_jit(batch):
  obj = losses.build_objective({"taid": {"total_steps": 100, "t_start": 0.4}, "cross_entropy": 1})
  state = obj.init_state()
  assert set(state) == {"taid"} and float(state["taid"].t) == pytest.approx(0.4)

  @jax.jit
  def step(state, i):
    total, metrics = obj(batch, state)
    return obj.update_state(state, metrics, i), metrics

  ts = []
  for i in range(4):
    state, metrics = step(state, i)
    ts.append(float(state["taid"].t))
  assert ts[0] == pytest.approx(0.4)  # First update only stores the loss.
  assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] > 0.4
  assert np.isfinite(metrics["loss/taid"])
  with pytest.raises(ValueError, match="stateful"):
    obj(batch)


def test_config_dict_and_custom_term(batch):
  @losses.register_loss_term("logit_l2", needs=(("student_logits",),))
  def logit_l2(inputs, *, scale=1.0):
    return scale * jnp.mean(jnp.square(inputs["student_logits"]))

  try:
    spec = ml_collections.ConfigDict({"logit_l2": {"scale": 0.5, "weight": 2.0}})
    total, metrics = losses.build_objective(spec)(batch)
    expect = 0.5 * np.mean(np.square(np.asarray(batch["student_logits"], np.float64)))
    np.testing.assert_allclose(metrics["loss/logit_l2"], expect, rtol=1e-5)
    np.testing.assert_allclose(total, 2 * expect, rtol=1e-5)
    with pytest.raises(ValueError, match="already registered"):
      losses.register_loss_term("logit_l2")(logit_l2)
  finally:
    del losses.LOSS_TERMS["logit_l2"]


@pytest.mark.parametrize("spec, match", [
    ({}, "at least one term"),
    ({"forwrd_kl": 1.0}, "did you mean.*forward_kl"),
    ({"generalized_jsd": {"betta": 0.5}}, "'betta' \\(did you mean 'beta'\\?\\)"),
    ({"generalized_jsd": {"beta": 1.5}}, "beta must lie in \\[0, 1\\]"),
    ({"cross_entropy": {"label_smothing": 0.1}}, "did you mean 'label_smoothing'"),
    ({"forward_kl": {"temperature": 0.0}}, "temperature must be > 0"),
    ({"forward_kl": float("nan")}, "weight must be a finite number"),
    ({"taid": {}}, "needs the option.*total_steps"),
    ({"forward_kl": "high"}, "must be a weight or a dict"),
])
def test_bad_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    losses.build_objective(spec)


def test_missing_inputs_names_them(batch):
  obj = losses.build_objective({"forward_kl": 1.0})
  with pytest.raises(ValueError, match="needs the inputs.*teacher_logits.*the batch has"):
    obj({"student_logits": batch["student_logits"]})
  with pytest.raises(ValueError, match="teacher vocab 7 != student vocab 13"):
    obj({"student_logits": batch["student_logits"],
         "teacher_logits": batch["teacher_logits"][..., :7]})


def test_feature_terms_route_and_match_numpy(batch):
  k = jax.random.split(jax.random.key(5), 4)
  s = [jax.random.normal(k[i], (2, 5, 6)) for i in range(2)]
  t = [jax.random.normal(jax.random.fold_in(k[2], i), (2, 5, 6)) for i in range(4)]
  inputs = dict(student_hiddens=s, teacher_hiddens=t, labels=batch["labels"],
                where=batch["where"], student_logits=batch["student_logits"],
                teacher_logits=batch["teacher_logits"])
  obj = losses.build_objective({"hidden_state": {"layer_map": "uniform"},
                                "sinkhorn": {"weight": 0.5}})
  total, metrics = jax.jit(lambda x: obj(x))(inputs)
  mask = (batch["labels"] != -100) & batch["where"]
  # uniform_layer_map(2, 4) pairs student 0 with teacher 1 and student 1 with teacher 3.
  mse = lambda a, b: np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, -1)
  expect = ((mse(s[0], t[1]) + mse(s[1], t[3])) / 2)[mask].mean()
  np.testing.assert_allclose(metrics["loss/hidden_state"], expect, rtol=1e-5)
  assert np.isfinite(metrics["loss/sinkhorn"]) and float(metrics["loss/sinkhorn"]) > 0
  np.testing.assert_allclose(total, expect + 0.5 * metrics["loss/sinkhorn"], rtol=1e-5)


def test_hidden_state_learns_projections_between_widths(batch):
  # Student width 4, teacher width 6: the term's own parameters are one [4, 6] projection per
  # mapped pair, made from the inputs' shapes alone; the loss is the MSE of the projected states.
  k = jax.random.split(jax.random.key(7), 2)
  s = jax.random.normal(k[0], (2, 2, 5, 4))  # [L, B, T, H] as the models return them
  t = jax.random.normal(k[1], (4, 2, 5, 6))
  inputs = dict(student_hiddens=s, teacher_hiddens=t, labels=batch["labels"],
                where=batch["where"])
  obj = losses.build_objective({"hidden_state": {"layer_map": "uniform"}})
  assert obj.input_keys == {"student_hiddens", "teacher_hiddens"}
  shapes = jax.eval_shape(lambda: obj.init_params(jax.random.key(0), jax.eval_shape(
      lambda: inputs)))
  assert shapes["hidden_state"].shape == (2, 4, 6)
  params = obj.init_params(jax.random.key(0), inputs)
  proj = np.asarray(params["hidden_state"], np.float64)
  assert 0.2 < proj.std() < 1.0  # LeCun normal: std about 1/sqrt(4)
  _, metrics = jax.jit(lambda x, p: obj(x, None, p))(inputs, params)
  mask = (batch["labels"] != -100) & batch["where"]
  s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
  mse = lambda a, b: np.mean((a - b) ** 2, -1)  # noqa: E731
  expect = ((mse(s64[0] @ proj[0], t64[1]) + mse(s64[1] @ proj[1], t64[3])) / 2)[mask].mean()
  np.testing.assert_allclose(metrics["loss/hidden_state"], expect, rtol=1e-5)
  grads = jax.grad(lambda p: obj(inputs, None, p)[0])(params)
  assert float(jnp.abs(grads["hidden_state"]).sum()) > 0
  with pytest.raises(ValueError, match="student width 4 != teacher width 6"):
    obj(inputs)
  # Equal widths: no parameters.
  assert obj.init_params(jax.random.key(0), dict(student_hiddens=t[:2], teacher_hiddens=t)) == {}


def test_input_keys_and_state_metrics_come_from_declarations():
  obj = losses.build_objective({"taid": {"total_steps": 10},
                                "attention_transfer": 0.5, "cross_entropy": 0.1})
  assert {"student_attentions", "teacher_attentions", "student_logits", "labels",
          "teacher_hidden"} <= obj.input_keys
  assert "student_hiddens" not in obj.input_keys
  state = obj.init_state()
  np.testing.assert_allclose(obj.state_metrics(state)["taid/t"], 0.4)
