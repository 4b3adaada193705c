"""CRD (jkd.losses.contrastive): InfoNCE, pooling, the FIFO memory bank and the ``crd`` term,
against the float64 NumPy reference of tests/reference_crd.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference_crd as ref
from jkd import losses

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _bank(rng, m=4, d=5):
  return (rng.standard_normal((m, d)), rng.standard_normal((m, d)),
          np.array([True] * (m - 1) + [False]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_matches_float64_reference(symmetric, rng):
  n, d = 6, 5
  s, t = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  t[:3] += 2 * s[:3]  # some positives close to their anchors
  where = np.array([True, True, False, True, True, False])
  tb, sb, bw = _bank(rng, d=d)
  for temperature in (0.07, 0.5):
    f = jit(functools.partial(losses.crd_loss, temperature=temperature, symmetric=symmetric))
    got = f(s.astype(np.float32), t.astype(np.float32), where=where)
    want = ref.crd_loss(s, t, temperature=temperature, where=where, symmetric=symmetric)
    assert got.dtype == jnp.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)
    assert (np.asarray(got)[~where] == 0).all()
    got = f(s.astype(np.float32), t.astype(np.float32), where=where, teacher_bank=tb,
            student_bank=sb, bank_where=bw)
    want = ref.crd_loss(s, t, temperature=temperature, where=where, teacher_bank=tb,
                        student_bank=sb, bank_where=bw, symmetric=symmetric)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


def test_hand_computed_and_invariances(rng):
  f = jit(losses.crd_loss, static_argnames="temperature")
  # Orthogonal pairs, tau = 1: each positive scores 1, each negative 0.
  e = np.eye(3, dtype=np.float32)
  np.testing.assert_allclose(f(e, e, temperature=1.0), 2 * (np.log(np.e + 2) - 1), rtol=1e-6)
  # The scale of an embedding does not matter (both sides are normalised).
  s, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
  np.testing.assert_allclose(f(s, t), f(3 * s, 0.5 * t), rtol=1e-5)
  # A bank with no valid row changes nothing.
  bank = rng.standard_normal((2, 3))
  np.testing.assert_allclose(
      f(s, t, teacher_bank=bank, student_bank=bank, bank_where=np.zeros(2, bool)), f(s, t),
      rtol=1e-6)


def test_gradients_float64(rng, x64):
  n, d = 5, 4
  s, t = rng.standard_normal((n, d)), rng.standard_normal((n, d))
  where = np.array([True, True, True, False, True])
  tb, sb, bw = _bank(rng, m=3, d=d)
  kwargs = dict(temperature=0.3, where=where, teacher_bank=tb, student_bank=sb, bank_where=bw)

  @jax.jit  # check_grads nests it: no compiler options
  def f(a, b):
    return jnp.sum(losses.crd_loss(a, b, **kwargs))
  assert f(jnp.asarray(s), jnp.asarray(t)).dtype == jnp.float64
  check_grads(f, (jnp.asarray(s), jnp.asarray(t)), order=1, modes=["rev"])
  gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))

  def numerical(x, which, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      hi, lo = x.copy(), x.copy()
      hi[idx] += eps
      lo[idx] -= eps
      args = lambda z: (z, t) if which == 0 else (s, z)  # noqa: E731
      grad[idx] = (ref.crd_loss(*args(hi), **kwargs).sum()
                   - ref.crd_loss(*args(lo), **kwargs).sum()) / (2 * eps)
    return grad
  np.testing.assert_allclose(gs, numerical(s, 0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gt, numerical(t, 1), rtol=1e-5, atol=1e-7)
  assert (np.asarray(gs)[~where] == 0).all() and (np.asarray(gt)[~where] == 0).all()
  # The bank is a constant.
  gb = jax.jit(jax.grad(lambda b: jnp.sum(losses.crd_loss(jnp.asarray(s), jnp.asarray(t), **{
      **kwargs, "teacher_bank": b}))))(jnp.asarray(tb))
  np.testing.assert_array_equal(gb, 0.0)


def test_masked_garbage_leaks_no_nan(rng):
  s, t = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 3))
  s[1], t[1], s[3] = np.nan, np.inf, 0.0
  where = np.array([True, False, True, False])
  values, grad = jit(jax.value_and_grad(
      lambda a: jnp.sum(losses.crd_loss(a, t, where=where))))(s)
  assert np.isfinite(values) and np.isfinite(grad).all()
  np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)


@pytest.mark.parametrize("pooling", ["sequence", "token"])
def test_pooling_matches_reference(pooling, rng):
  h = rng.standard_normal((3, 4, 5)).astype(np.float32)
  where = np.array([[True, True, False, True], [False] * 4, [True, False, False, False]])
  got, counted = losses.crd_pool(h, where=where, pooling=pooling)
  want, want_counted = ref.pool(h, where, pooling)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(counted, want_counted)


def test_bank_is_a_fifo(rng):
  size, d = 5, 3
  bank = losses.crd_bank_init(size=size, feature_dim=d)
  want = ref.RingBank(size, d)
  push = jit(lambda b, t, s, w: losses.crd_bank_push(b, t, s, where=w))
  pushes = [(3, [True, False, True]), (4, [True, True, True, True]),
            (7, [True, False, True, True, True, True, True]),  # more rows than the bank holds
            (2, [False, False])]
  for n, where in pushes:
    t, s = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    bank = push(bank, t.astype(np.float32), s.astype(np.float32), np.array(where))
    want.push(t, s, where)
    np.testing.assert_allclose(bank.teacher, want.teacher, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bank.student, want.student, rtol=1e-6, atol=1e-7)
    assert int(bank.filled) == want.filled and int(bank.position) == want.position
  assert want.count == 2 + 4 + 6 and want.filled == size


# ----------------------------------------------------------------------------------------------
# The ``crd`` objective term.
# ----------------------------------------------------------------------------------------------

def _inputs(rng, b=3, t=5, hs=6, ht=10):
  labels = rng.integers(0, 9, (b, t))
  labels[0, 3:] = -100
  where = np.ones((b, t), bool)
  where[1, 0] = False
  return dict(student_hidden=rng.standard_normal((b, t, hs)).astype(np.float32),
              teacher_hidden=rng.standard_normal((b, t, ht)).astype(np.float32),
              labels=labels, where=where)


def _reference_embeddings(inputs, params, pooling):
  mask = (inputs["labels"] != -100) & inputs["where"]
  out = []
  for side in ("student", "teacher"):
    x, counted = ref.pool(inputs[f"{side}_hidden"], mask, pooling)
    p = params["crd"][side]
    out.append(x @ ref.f64(p["kernel"]) + ref.f64(p["bias"]))
  return out[0], out[1], counted


@pytest.mark.parametrize("pooling", ["sequence", "token"])
def test_term_matches_reference_and_trains_its_projections(pooling, rng):
  obj = losses.build_objective({"crd": {"feature_dim": 4, "temperature": 0.2,
                                        "pooling": pooling}})
  inputs = _inputs(rng)
  params = obj.init_params(jax.random.key(0), inputs)
  assert jax.tree.map(jnp.shape, params) == {"crd": {
      "student": {"kernel": (6, 4), "bias": (4,)}, "teacher": {"kernel": (10, 4), "bias": (4,)}}}
  assert obj.init_state() == {}
  total, metrics = jit(lambda i, p: obj(i, None, p))(inputs, params)
  s, t, counted = _reference_embeddings(inputs, params, pooling)
  want = ref.crd_loss(s, t, temperature=0.2, where=counted)[counted].mean()
  np.testing.assert_allclose(metrics["loss/crd"], want, rtol=1e-5)
  np.testing.assert_allclose(total, want, rtol=1e-5)
  grads = jit(jax.grad(lambda p, h: obj(dict(inputs, student_hidden=h), None, p)[0],
                       argnums=(0, 1)))(params, inputs["student_hidden"])
  for g in jax.tree.leaves(grads):
    assert np.isfinite(g).all() and np.abs(g).sum() > 0  # both projections and the student


def test_term_memory_bank_through_update_state(rng):
  size = 4
  spec = {"crd": {"feature_dim": 3, "temperature": 0.5, "memory_size": size},
          "ce": {"term": "cross_entropy", "weight": 0.0}}
  obj = losses.build_objective(spec)
  batches = [_inputs(rng) for _ in range(3)]
  for b in batches:
    b["student_logits"] = rng.standard_normal(b["labels"].shape + (9,)).astype(np.float32)
  params = obj.init_params(jax.random.key(1), batches[0])
  state = obj.init_state()
  assert int(state["crd"].filled) == 0 and state["crd"].teacher.shape == (size, 3)

  @jit
  def step(state, batch, i):
    total, metrics = obj(batch, state, params)
    assert losses.STATE_INPUTS in metrics
    new = obj.update_state(state, metrics, i)
    assert losses.STATE_INPUTS not in metrics  # removed: what is logged stays scalars
    metrics.update(obj.state_metrics(new))
    return new, metrics

  bank = ref.RingBank(size, 3)
  for i, batch in enumerate(batches):
    s, t, counted = _reference_embeddings(batch, params, "sequence")
    want = ref.crd_loss(s, t, temperature=0.5, where=counted, teacher_bank=bank.teacher,
                        student_bank=bank.student, bank_where=bank.valid())[counted].mean()
    state, metrics = step(state, batch, i)
    assert all(np.shape(v) == () for v in metrics.values())
    np.testing.assert_allclose(metrics["loss/crd"], want, rtol=1e-5)
    bank.push(t, s, counted)
    np.testing.assert_allclose(state["crd"].teacher, bank.teacher, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["crd"].student, bank.student, rtol=1e-5, atol=1e-6)
    assert int(state["crd"].filled) == bank.filled == metrics["crd/bank_filled"]
  assert bank.count == 9  # 3 sequences a step, one of them wrapped around the bank
  with pytest.raises(ValueError, match="stateful"):
    obj(batches[0], None, params)
  with pytest.raises(ValueError, match="embeddings of the step"):
    obj.update_state(state, {"loss/crd": 0.0, "loss/ce": 0.0}, 0)


def test_term_errors(rng):
  inputs = _inputs(rng)
  obj = losses.build_objective({"crd": {}})
  with pytest.raises(ValueError, match="init_params"):
    obj(inputs)
  with pytest.raises(ValueError, match=r"needs the inputs \(student_hidden, teacher_hidden\)"):
    obj({"student_hidden": inputs["student_hidden"]}, None, {"crd": {}})
  for options, match in [({"pooling": "mean"}, "pooling must be one of"),
                         ({"memory_size": -1}, "memory_size must be an int >= 0"),
                         ({"feature_dim": 0}, "feature_dim must be an int >= 1"),
                         ({"temperature": 0.0}, "temperature must be > 0"),
                         ({"symmetric": "yes"}, "symmetric must be True or False"),
                         ({"memory": 8}, "did you mean 'memory_size'")]:
    with pytest.raises(ValueError, match=match):
      losses.build_objective({"crd": options})


def test_bad_inputs_raise_clear_errors():
  z = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match="same shape"):
    losses.crd_loss(z, np.zeros((3, 5), np.float32))
  with pytest.raises(ValueError, match=r"\[N, D\] embeddings"):
    losses.crd_loss(z[None], z[None])
  with pytest.raises(TypeError, match="floating-point"):
    losses.crd_loss(z.astype(np.int32), z)
  with pytest.raises(ValueError, match="feature dimension 5"):
    losses.crd_loss(z, z, teacher_bank=np.zeros((2, 5)), student_bank=np.zeros((2, 5)))
  with pytest.raises(ValueError, match="needs both banks"):
    losses.crd_loss(z, z, teacher_bank=np.zeros((2, 4)))
  with pytest.raises(ValueError, match="no bank"):
    losses.crd_loss(z, z, bank_where=np.ones(2, bool))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.crd_loss(z, z, temperature=-1.0)
  with pytest.raises(ValueError, match=r"where has shape \(4,\)"):
    losses.crd_loss(z, z, where=np.ones(4, bool))
  with pytest.raises(ValueError, match="pooling must be one of"):
    losses.crd_pool(np.zeros((1, 2, 3)), pooling="max")
  with pytest.raises(ValueError, match="size must be a positive int"):
    losses.crd_bank_init(size=0, feature_dim=3)


def test_grad_accum_fills_the_bank_with_every_rows_embeddings():
  """With train.grad_accum=2 the bank receives each micro-batch's rows (stacked), the same
  embeddings as one full batch: 4 rows in, not 2 averaged ones."""
  from jkd import models, train
  from jkd.train import step as step_lib
  tcfg = models.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1)
  tparams = models.init_params(tcfg, jax.random.key(0))
  scfg, sparams = models.student_from_teacher(tparams, tcfg, every=2)
  obj = losses.build_objective({"crd": {"feature_dim": 4, "memory_size": 8}, "forward_kl": 1.0})
  opt, sched = train.make_optimizer({"lr": 1e-2, "warmup_steps": 0}, 10)
  term_params = step_lib.init_term_params(obj, jax.random.key(3), params=sparams,
                                       teacher_params=tparams, student_config=scfg,
                                       teacher_config=tcfg)
  tokens = np.random.default_rng(0).integers(0, 32, (4, 6)).astype(np.int32)
  batch = {"tokens": tokens, "labels": np.roll(tokens, -1, axis=1)}
  banks = {}
  for accum in (1, 2):
    state = train.init_state(sparams, opt, obj, term_params)
    step = jit(train.make_train_step(student_config=scfg, teacher_config=tcfg,
                                     objective=obj, optimizer=opt, schedule=sched,
                                     grad_accum=accum))
    state, _ = step(state, batch, jax.random.key(0), tparams)
    bank = state.objective_state["crd"]
    assert int(bank.filled) == 4, accum
    banks[accum] = {k: np.asarray(getattr(bank, k))[:4] for k in ("teacher", "student")}
  for side in ("teacher", "student"):  # Micro-batch j holds rows j, j + 2: order 0, 2, 1, 3.
    np.testing.assert_allclose(banks[2][side], banks[1][side][[0, 2, 1, 3]], rtol=1e-5,
                               atol=1e-6)
