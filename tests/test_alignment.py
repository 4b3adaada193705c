"""Reference-free and distillation-flavoured preference losses (jkd.losses.reference_free, .dpo,
.aligned_teacher): SimPO, CPO, ORPO, KTO, REDI, DCKD and ADPA against the float64 NumPy
references of reference_preference.py, under ``jax.jit`` with options bound by closures.

(``preference_loss`` and ``preference_metrics`` are tested in test_preference.py.)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import reference_preference as rp
from jkd.losses import aligned_teacher
from jkd.losses import dpo
from jkd.losses import reference_free

B = 8

#: (case id, library function, reference function, options) of the losses of two [B] arrays
#: (averaged log-probs for SimPO, ORPO, REDI; CPO's are summed, the domain is the same).
PAIR_CASES = [
    ("simpo", reference_free.simpo_loss, rp.simpo_loss, {}),
    ("simpo-ls0.1", reference_free.simpo_loss, rp.simpo_loss,
     {"beta": 2.5, "gamma_beta_ratio": 0.5, "label_smoothing": 0.1}),
    ("simpo-gamma0", reference_free.simpo_loss, rp.simpo_loss,
     {"beta": 1.0, "gamma_beta_ratio": 0.0}),
    ("cpo", reference_free.cpo_loss, rp.cpo_loss, {}),
    ("cpo-ls0.1-b0.5", reference_free.cpo_loss, rp.cpo_loss, {"beta": 0.5, "label_smoothing": 0.1}),
    ("orpo", reference_free.orpo_loss, rp.orpo_loss, {}),
    ("orpo-lam0.5", reference_free.orpo_loss, rp.orpo_loss, {"lam": 0.5}),
    ("redi", reference_free.redi_loss, rp.redi_loss, {}),
    ("redi-c0.5-0.2", reference_free.redi_loss, rp.redi_loss, {"c_pos": 0.5, "c_neg": 0.2}),
]
PAIR_IDS = [c[0] for c in PAIR_CASES]


def avg_logps(rng, n=B):
  """Length-averaged log-probs of a chosen and a rejected completion, float32 ``[n]``."""
  return tuple(rng.uniform(-3.0, -0.05, n).astype(np.float32) for _ in range(2))


def extreme_pair():
  """Averaged log-probs near 0 (-1e-6) and very negative (-1e4), no two equal."""
  t, g = -1e-6, -1e4
  pc = np.array([t, g, 2 * t, g + 1, -0.5, -3e3, t, -1e-5], np.float32)
  pr = np.array([g, t, g + 2, 3 * t, -2e3, -0.25, -7.0, -2e-5], np.float32)
  return pc, pr


def assert_close(actual, expected, *, rtol=2e-5, atol=2e-5):
  actual = np.asarray(actual)
  assert np.isfinite(actual).all(), f"non-finite values in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@functools.cache
def _pair_cases():
  """One jitted function: each case's losses and the gradient of their sum wrt both inputs."""
  def run(pc, pr):
    out = {}
    for cid, fn, _, options in PAIR_CASES:
      values, vjp = jax.vjp(functools.partial(fn, **options), pc, pr)
      out[cid] = (values, vjp(jnp.ones_like(values)))
    return out
  return jax.jit(run)


def orpo_grads(lc, lr, lam):
  """Analytic gradient of ``-lc - lam log s(L)``: ``dL/dlc = 1/(1 - e^lc)``, ``dL/dlr = -1/(1 -
  e^lr)``."""
  lc, lr = rp.f64(lc), rp.f64(lr)
  s = rp.sigmoid(-rp.orpo_log_odds_ratio(lc, lr))
  return -1.0 - lam * s / -np.expm1(lc), lam * s / -np.expm1(lr)


def ref_pair_grads(cid, ref_fn, options, pc, pr):
  if cid.startswith("orpo"):
    return orpo_grads(pc, pr, options.get("lam", 0.1))
  f = functools.partial(ref_fn, **options)
  return (rp.numerical_grad(lambda x: f(x, pr), pc), rp.numerical_grad(lambda x: f(pc, x), pr))


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
@pytest.mark.parametrize("case", PAIR_CASES, ids=PAIR_IDS)
def test_pair_losses_match_reference(case, extreme, rng):
  cid, _, ref_fn, options = case
  pc, pr = extreme_pair() if extreme else avg_logps(rng)
  values, (g_pc, g_pr) = _pair_cases()(pc, pr)[cid]
  assert values.shape == (B,) and values.dtype == jnp.float32
  assert_close(values, ref_fn(pc, pr, **options), rtol=1e-5, atol=1e-4 if extreme else 2e-5)
  want_pc, want_pr = ref_pair_grads(cid, ref_fn, options, pc, pr)
  assert_close(g_pc, want_pc, rtol=1e-4, atol=1e-5)
  assert_close(g_pr, want_pr, rtol=1e-4, atol=1e-5)


def test_check_grads_float64(rng):
  with jax.enable_x64(True):
    pc, pr = (jnp.asarray(x, jnp.float64) for x in avg_logps(rng, 4))
    nll = jnp.asarray(rng.uniform(0.5, 2.0, 4))
    f = lambda a, b, n: jnp.stack(
        [fn(a, b, **options) for _, fn, _, options in PAIR_CASES]
        + [reference_free.cpo_loss(a, b, chosen_nll=n, alpha=0.5),
           reference_free.orpo_loss(a, b, chosen_nll=n)])
    assert f(pc, pr, nll).dtype == jnp.float64
    check_grads(f, (pc, pr, nll), order=1, modes=["rev"])


# ----------------------------------------------------------------------------------------------
# SimPO, CPO, ORPO, REDI: documented limits and options.
# ----------------------------------------------------------------------------------------------

def test_simpo_without_margin_is_reference_free_sigmoid_on_averages(rng):
  pc, pr = avg_logps(rng)
  z = np.zeros(B, np.float32)

  @jax.jit
  def run(a, b):
    return (reference_free.simpo_loss(a, b, beta=2.0, gamma_beta_ratio=0.0),
            dpo.sigmoid_norm_loss(a, b, z, z, beta=2.0),
            dpo.dpo_loss(a, b, z, z, beta=2.0))
  simpo, norm, plain = run(pc, pr)
  np.testing.assert_allclose(simpo, norm, rtol=1e-6)
  np.testing.assert_allclose(simpo, plain, rtol=1e-6)
  # The margin gamma = beta * ratio shifts the argument: simpo(pc, pr) = simpo0(pc - ratio, pr).
  shifted = jax.jit(functools.partial(reference_free.simpo_loss, beta=2.0, gamma_beta_ratio=0.3))
  np.testing.assert_allclose(shifted(pc, pr), run(pc - 0.3, pr)[0], rtol=1e-5)


def test_cpo_nll_term(rng):
  pc, pr = avg_logps(rng)
  nll = rng.uniform(0.5, 2.0, B).astype(np.float32)
  f = jax.jit(jax.value_and_grad(
      lambda a, b, n: jnp.sum(reference_free.cpo_loss(a, b, beta=0.2, label_smoothing=0.1,
                                                 chosen_nll=n, alpha=0.5)), argnums=(0, 1, 2)))
  value, (g_pc, g_pr, g_nll) = f(pc, pr, nll)
  ref = functools.partial(rp.cpo_loss, beta=0.2, label_smoothing=0.1, alpha=0.5)
  assert_close(value, np.sum(ref(pc, pr, chosen_nll=nll)), rtol=1e-5)
  np.testing.assert_allclose(g_nll, 0.5)
  assert_close(g_pc, rp.numerical_grad(lambda x: ref(x, pr, chosen_nll=nll), pc), rtol=1e-4)
  assert_close(g_pr, rp.numerical_grad(lambda x: ref(pc, x, chosen_nll=nll), pr), rtol=1e-4)
  # alpha scales it; without chosen_nll the preference term alone.
  plain = jax.jit(functools.partial(reference_free.cpo_loss, beta=0.2))(pc, pr)
  assert_close(plain, rp.cpo_loss(pc, pr, beta=0.2))


def test_orpo_equal_completions_penalty_is_lam_log2(rng):
  lc, _ = avg_logps(rng)
  for lam in (0.1, 0.7):
    f = jax.jit(functools.partial(reference_free.orpo_loss, lam=lam))
    assert_close(f(lc, lc), -rp.f64(lc) + lam * math.log(2), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(reference_free.orpo_log_odds_ratio)(lc, lc), 0.0, atol=1e-6)


def test_orpo_log_odds_ratio_and_nll(rng):
  lc, lr = avg_logps(rng)
  got = jax.jit(reference_free.orpo_log_odds_ratio)(lc, lr)
  assert_close(got, rp.orpo_log_odds_ratio(lc, lr), rtol=1e-5, atol=1e-5)
  ext_c, ext_r = extreme_pair()
  assert_close(jax.jit(reference_free.orpo_log_odds_ratio)(ext_c, ext_r),
               rp.orpo_log_odds_ratio(ext_c, ext_r), rtol=1e-5, atol=1e-3)
  nll = rng.uniform(0.5, 2.0, B).astype(np.float32)
  f = jax.jit(functools.partial(reference_free.orpo_loss, lam=0.3))
  assert_close(f(lc, lr, chosen_nll=nll), rp.orpo_loss(lc, lr, lam=0.3, chosen_nll=nll))
  # lam = 0: the NLL alone.
  assert_close(jax.jit(functools.partial(reference_free.orpo_loss, lam=0.0))(lc, lr), -rp.f64(lc))


def test_orpo_probability_one_is_clipped():
  """Log-probs of 0 (probability 1, infinite odds) are clipped to -1e-7: finite values and
  gradients, equal to the value at -1e-7."""
  lc = np.array([0.0, -1e-7, -0.5], np.float32)
  lr = np.array([-2.0, 0.0, 0.0], np.float32)
  f = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(reference_free.orpo_loss(a, b))))
  value, grad = f(lc, lr)
  assert np.isfinite(value) and np.isfinite(grad).all()
  clipped = np.minimum(lc, -1e-7), np.minimum(lr, -1e-7)
  ref = rp.orpo_loss(*clipped) + (clipped[0] - lc)  # the NLL term is not clipped
  assert_close(value, ref.sum(), rtol=1e-5)


def test_redi_grads_are_the_weights(rng):
  pos, neg = avg_logps(rng)
  g = jax.jit(jax.grad(lambda a, b: jnp.sum(reference_free.redi_loss(a, b, c_pos=0.7, c_neg=0.3)),
                       argnums=(0, 1)))(pos, neg)
  np.testing.assert_allclose(g[0], -0.7)
  np.testing.assert_allclose(g[1], 0.3)


def test_reference_free_bad_input(rng):
  pc, pr = avg_logps(rng)
  with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(7,\) but"
                     r" policy_chosen_logps has \(8,\)"):
    reference_free.simpo_loss(pc, pr[1:])
  with pytest.raises(ValueError, match=r"policy_rejected_logps has shape"):
    reference_free.orpo_loss(pc, pr[1:])
  with pytest.raises(ValueError, match=r"negative_logps has shape"):
    reference_free.redi_loss(pc, pr[1:])
  with pytest.raises(ValueError, match="beta must be > 0"):
    reference_free.simpo_loss(pc, pr, beta=0.0)
  with pytest.raises(ValueError, match="beta must be > 0"):
    reference_free.cpo_loss(pc, pr, beta=-1.0)
  with pytest.raises(ValueError, match="gamma_beta_ratio must be finite"):
    reference_free.simpo_loss(pc, pr, gamma_beta_ratio=float("nan"))
  for fn in (reference_free.simpo_loss, reference_free.cpo_loss):
    with pytest.raises(ValueError, match=r"label_smoothing must be <= 0.5 \(got 0.7\)"):
      fn(pc, pr, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
      fn(pc, pr, label_smoothing=-0.1)
  with pytest.raises(ValueError, match=r"chosen_nll shape \(7,\) != log-probs shape \(8,\)"):
    reference_free.cpo_loss(pc, pr, chosen_nll=pc[1:])
  with pytest.raises(ValueError, match=r"chosen_nll has shape \(1,\) but policy_chosen_logps"
                     r" has \(8,\)"):
    reference_free.orpo_loss(pc, pr, chosen_nll=pc[:1])
  with pytest.raises(ValueError, match="lam must be > 0"):
    reference_free.orpo_loss(pc, pr, lam=-0.1)
  with pytest.raises(TypeError, match="positive_logps must be a floating-point array"):
    reference_free.redi_loss(np.arange(3), np.arange(3))


# ----------------------------------------------------------------------------------------------
# KTO.
# ----------------------------------------------------------------------------------------------

def kto_inputs(rng):
  policy = rng.uniform(-60.0, -5.0, B).astype(np.float32)
  ref = (policy + rng.uniform(-10.0, 10.0, B)).astype(np.float32)
  desirable = np.array([True, False] * (B // 2))
  rng.shuffle(desirable)
  return policy, ref, desirable


def test_kto_kl_estimate(rng):
  p = rng.uniform(-60.0, -5.0, B).astype(np.float32)
  f = jax.jit(dpo.kto_kl_estimate)
  for shift in (3.0, -3.0):  # a positive mean, and a negative one (clipped to 0)
    r = (p - shift + rng.uniform(-1, 1, B)).astype(np.float32)
    assert_close(f(p, r), rp.kto_kl_estimate(p, r), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(jax.grad(lambda x: f(x, p - 3.0))(p), 0.0)


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_kto_matches_reference(extreme, rng):
  policy, ref, desirable = kto_inputs(rng)
  if extreme:  # log-ratios of +-1e4 and ~1e-6
    ref = np.array([-1e-6, -1e4, -1e-6, -1e4, -2e-6, -1e-6, -3.0, -5e3], np.float32)
    policy = np.array([-1e4, -1e-6, -2e-6, -1e4 + 1, -1e-6, -1e4, -1e-6, -1e-6], np.float32)
  kl = 0.75
  options = {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.33}
  f = jax.jit(jax.value_and_grad(
      lambda p, r, d: (jnp.sum(dpo.kto_loss(p, r, d, kl=kl, **options)),
                       dpo.kto_loss(p, r, d, kl=kl, **options)), has_aux=True))
  (_, values), grad = f(policy, ref, desirable)
  want = functools.partial(rp.kto_loss, desirable=desirable, kl=kl, **options)
  assert_close(values, want(policy, ref), rtol=1e-5, atol=1e-6)
  assert_close(grad, rp.numerical_grad(lambda x: want(x, ref), policy), rtol=1e-4, atol=1e-6)


def test_kto_with_zero_reference_point(rng):
  """z = 0: desirable ``1 - s(beta r)``, undesirable ``s(beta r)``; they sum to 1."""
  policy, ref, _ = kto_inputs(rng)
  f = jax.jit(functools.partial(dpo.kto_loss, kl=0.0, beta=0.3))
  good = f(policy, ref, np.ones(B, bool))
  bad = f(policy, ref, np.zeros(B, bool))
  r = rp.f64(policy) - ref
  assert_close(good, 1 - rp.sigmoid(0.3 * r), rtol=1e-5, atol=1e-6)
  assert_close(bad, rp.sigmoid(0.3 * r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(good) + np.asarray(bad), 1.0, rtol=1e-6)


def test_kto_reference_point_gets_no_gradient(rng):
  """``z = sg(...)``: no gradient through it, from the estimate or from a traced ``kl``."""
  policy, ref, desirable = kto_inputs(rng)
  kl_p = rng.uniform(-60.0, -5.0, B).astype(np.float32)
  kl_r = (kl_p - 2.0).astype(np.float32)

  @jax.jit
  def grads(p, kp):
    def loss(p, kp):
      z = dpo.kto_kl_estimate(kp, kl_r)
      return jnp.sum(dpo.kto_loss(p, ref, desirable, kl=z))
    through_kl = jax.grad(lambda p: jnp.sum(dpo.kto_loss(
        p, ref, desirable, kl=jnp.mean(p - ref))))(p)
    return jax.grad(loss, argnums=(0, 1))(p, kp), through_kl
  (g_p, g_kp), through_kl = grads(policy, kl_p)
  np.testing.assert_array_equal(g_kp, 0.0)
  z = rp.kto_kl_estimate(kl_p, kl_r)
  want = rp.numerical_grad(lambda x: rp.kto_loss(x, ref, desirable, kl=z), policy)
  assert_close(g_p, want, rtol=1e-4, atol=1e-7)
  z2 = float(np.mean(rp.f64(policy) - ref))
  want2 = rp.numerical_grad(lambda x: rp.kto_loss(x, ref, desirable, kl=z2), policy)
  assert_close(through_kl, want2, rtol=1e-4, atol=1e-7)


def test_kto_bad_input(rng):
  policy, ref, desirable = kto_inputs(rng)
  with pytest.raises(ValueError, match="desirable must be a bool array of shape"):
    dpo.kto_loss(policy, ref, desirable.astype(np.int32), kl=0.0)
  with pytest.raises(ValueError, match="desirable must be a bool array of shape"):
    dpo.kto_loss(policy, ref, desirable[1:], kl=0.0)
  with pytest.raises(ValueError, match=r"ref_logps has shape \(7,\)"):
    dpo.kto_loss(policy, ref[1:], desirable, kl=0.0)
  with pytest.raises(ValueError, match="beta must be > 0"):
    dpo.kto_loss(policy, ref, desirable, kl=0.0, beta=0.0)
  with pytest.raises(ValueError, match=r"ref_kl_logps has shape"):
    dpo.kto_kl_estimate(policy, ref[1:])


# ----------------------------------------------------------------------------------------------
# DCKD and ADPA.
# ----------------------------------------------------------------------------------------------

D_B, D_T, D_V, D_K = 2, 5, 12, 4


def topk_teacher(rng, shape, k):
  """Top-k ids (int32) and float32 log-probs of random teacher logits ``shape + (V,)``."""
  lp = rp.log_softmax(rng.standard_normal(shape) * 2.0)
  ids = np.argsort(-lp, axis=-1)[..., :k]
  return ids.astype(np.int32), np.take_along_axis(lp, ids, -1).astype(np.float32)


def dckd_inputs(rng):
  out = []
  for prompt in ([1, 2], [2, 0]):
    logits = (rng.standard_normal((D_B, D_T, D_V)) * 2.0).astype(np.float32)
    labels = rng.integers(0, D_V, (D_B, D_T)).astype(np.int32)
    for b, n in enumerate(prompt):
      labels[b, :n] = -100
    ids, lp = topk_teacher(rng, (D_B, D_T, D_V), D_K)
    lp[labels == -100] = -np.inf  # padding in a teacher cache: never read
    out.append((logits, labels, ids, lp))
  return out


def test_dckd_matches_reference(rng):
  (zc, yc, ic, lc), (zr, yr, ir, lr) = dckd_inputs(rng)
  w = 0.3

  @jax.jit
  def run(zc, zr):
    def loss(zc, zr):
      values = aligned_teacher.dckd_loss(zc, yc, aligned_teacher.SparseTeacher(ic, lc), zr, yr,
                                   aligned_teacher.SparseTeacher(ir, lr), kd_weight=w)
      return jnp.sum(values), values
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(zc, zr)
  (_, values), (g_c, g_r) = run(zc, zr)
  ref = lambda a, b: rp.dckd_loss(a, yc, ic, lc, b, yr, ir, lr, kd_weight=w)
  assert values.shape == (D_B,)
  assert_close(values, ref(zc, zr), rtol=1e-5, atol=1e-5)
  assert_close(g_c, rp.numerical_grad(lambda x: ref(x, zr), zc), rtol=1e-4, atol=1e-6)
  assert_close(g_r, rp.numerical_grad(lambda x: ref(zc, x), zr), rtol=1e-4, atol=1e-6)


def test_dckd_with_teacher_equal_to_student_is_nll(rng):
  """k = V and the teacher equal to the student: the KL terms vanish, the loss is the NLL."""
  (zc, yc, _, _), (zr, yr, _, _) = dckd_inputs(rng)
  ids = np.broadcast_to(np.arange(D_V, dtype=np.int32), (D_B, D_T, D_V))
  teach = lambda z: aligned_teacher.SparseTeacher(ids, rp.log_softmax(z).astype(np.float32))
  out = jax.jit(lambda a, b: aligned_teacher.dckd_loss(a, yc, teach(zc), b, yr, teach(zr)))(zc, zr)
  _, mean, _ = rp.sequence_logprobs(zc, yc)
  assert_close(out, -mean, rtol=1e-5, atol=1e-5)


ADPA_SHAPE = (2, 4, 10)
ADPA_K = 3


def adpa_inputs(rng):
  zs = (rng.standard_normal(ADPA_SHAPE) * 2.0).astype(np.float32)
  ids, lp = topk_teacher(rng, ADPA_SHAPE, ADPA_K)
  _, lr = topk_teacher(rng, ADPA_SHAPE, ADPA_K)
  where = np.ones(ADPA_SHAPE[:-1], bool)
  where[0, 0] = where[1, 3] = False
  return zs, ids, lp, lr, where


def _adpa_value_and_grad():
  def f(z, ids, lp, lr, where):
    values = aligned_teacher.adpa_advantage_loss(z, ids, lp, lr, where=where)
    return jnp.sum(values), values
  return jax.jit(jax.value_and_grad(f, has_aux=True))


def test_adpa_matches_reference(rng):
  zs, ids, lp, lr, where = adpa_inputs(rng)
  (_, values), grad = _adpa_value_and_grad()(zs, ids, lp, lr, where)
  ref = lambda z: rp.adpa_advantage(z, ids, lp, lr, where=where)
  assert values.shape == ADPA_SHAPE[:-1]
  assert_close(values, ref(zs), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(values)[~where], 0.0)
  assert_close(grad, rp.numerical_grad(ref, zs), rtol=1e-4, atol=1e-6)
  # Without a mask every position counts.
  out = jax.jit(aligned_teacher.adpa_advantage_loss)(zs, ids, lp, lr)
  assert_close(out, rp.adpa_advantage(zs, ids, lp, lr), rtol=1e-5, atol=1e-6)


def test_adpa_garbage_at_masked_positions(rng):
  """Padding positions holding -inf log-probs, -100 ids and NaN logits: values and gradient
  equal those with clean inputs there (double where), and are finite."""
  zs, ids, lp, lr, where = adpa_inputs(rng)
  clean = _adpa_value_and_grad()(zs, ids, lp, lr, where)
  zs2, ids2, lp2, lr2 = zs.copy(), ids.copy(), lp.copy(), lr.copy()
  zs2[~where] = np.nan
  ids2[~where] = -100
  lp2[~where] = -np.inf
  lr2[~where] = -np.inf
  dirty = _adpa_value_and_grad()(zs2, ids2, lp2, lr2, where)
  for a, b in zip(jax.tree.leaves(dirty), jax.tree.leaves(clean)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Eagerly, ids at masked positions are not checked either.
  eager = aligned_teacher.adpa_advantage_loss(zs2, ids2, lp2, lr2, where=where)
  np.testing.assert_allclose(eager, clean[0][1], rtol=1e-6, atol=1e-7)


def test_adpa_bad_input(rng):
  zs, ids, lp, lr, where = adpa_inputs(rng)
  f = aligned_teacher.adpa_advantage_loss
  with pytest.raises(ValueError, match=r"teacher_ids \(2, 4, 3\), teacher_logprobs \(2, 4, 2\)"):
    f(zs, ids, lp[..., :2], lr)
  with pytest.raises(ValueError, match=r"must all be \(2, 4\) \+ \(k,\)"):
    f(zs, ids[:, 1:], lp[:, 1:], lr[:, 1:])
  bad = ids.copy()
  bad[0, 1, 0] = 10
  with pytest.raises(ValueError, match="teacher_ids contains ids outside the vocabulary"):
    f(zs, bad, lp, lr, where=where)
  with pytest.raises(TypeError, match="teacher_ids must be integer token ids"):
    f(zs, ids.astype(np.float32), lp, lr)
  with pytest.raises(ValueError, match="where has shape"):
    f(zs, ids, lp, lr, where=where[:, 1:])
