"""BD-KD's balanced divergence (jkd.losses.balanced_kl): what the shared divergence tests
(tests/test_divergences.py, test_sparse.py, test_fused.py, which run every divergence of
tests/reference.py's SPECS, balanced_kl included) do not: the balancing rule itself, its
analytic float64 gradient, and the objective term's three routes."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from jkd import losses

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def test_hand_computed_value():
  """p = (1/2, 1/2), q = (1/4, 3/4): w_f = H(p) / (H(p) + H(q)), w_r = H(q) / (H(p) + H(q))."""
  zt = np.log(np.array([[0.5, 0.5]], np.float32))
  zs = np.log(np.array([[0.25, 0.75]], np.float32))
  ln = math.log
  h_p, h_q = ln(2), -(0.25 * ln(0.25) + 0.75 * ln(0.75))
  fkl = 0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75)
  rkl = 0.25 * ln(0.25 / 0.5) + 0.75 * ln(0.75 / 0.5)
  want = (h_p * fkl + h_q * rkl) / (h_p + h_q)
  np.testing.assert_allclose(ref.full_divergence("balanced_kl", np.log([[0.25, 0.75]]),
                                                 np.log([[0.5, 0.5]])), want, rtol=1e-12)
  np.testing.assert_allclose(losses.balanced_kl(zs, zt), want, rtol=1e-6)
  # T = 2 on doubled logits: the same distributions, times T**2.
  np.testing.assert_allclose(losses.balanced_kl(2 * zs, 2 * zt, temperature=2.0), 4 * want,
                             rtol=1e-6)


def test_balancing_rule(rng):
  f = jit(lambda a, b: [losses.balanced_kl(a, b), losses.forward_kl(a, b),
                        losses.reverse_kl(a, b)])
  # Equal entropies (the teacher a permutation of the student): the mean of the two KLs.
  zs = rng.standard_normal((6, 9)).astype(np.float32) * 2
  zt = zs[:, rng.permutation(9)]
  bd, fkl, rkl = f(zs, zt)
  np.testing.assert_allclose(bd, (fkl + rkl) / 2, rtol=1e-5)
  # A flatter student (higher entropy) leans on reverse KL, a sharper one on forward KL; the
  # value lies between the two KLs.
  zt = rng.standard_normal((6, 9)).astype(np.float32)
  for scale, closer in ((0.2, "reverse"), (5.0, "forward")):
    bd, fkl, rkl = map(np.asarray, f(zt * scale + 0.3 * rng.standard_normal((6, 9)), zt))
    near, far = (rkl, fkl) if closer == "reverse" else (fkl, rkl)
    assert (np.abs(bd - near) < np.abs(bd - far)).all(), (scale, bd, fkl, rkl)
    assert ((bd >= np.minimum(fkl, rkl) - 1e-6) & (bd <= np.maximum(fkl, rkl) + 1e-6)).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_float64_matches_the_analytic_form(temperature, rng, x64):
  """With the weights constants: d/dzs = T [w_f (q - p) + w_r q (log q/p - KL(q||p))]."""
  zs, zt = rng.standard_normal((4, 7)) * 2, rng.standard_normal((4, 7)) * 2
  grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.balanced_kl(
      x, jnp.asarray(zt), temperature=temperature))))(jnp.asarray(zs))
  assert grad.dtype == jnp.float64
  lq, lp = ref.log_softmax(zs, temperature), ref.log_softmax(zt, temperature)
  q, p = np.exp(lq), np.exp(lp)
  w = ref.balanced_kl_weights(lq, lp)
  want = temperature * (w[..., :1] * (q - p)
                        + w[..., 1:] * q * (lq - lp - ref.kl(lq, lp)[..., None]))
  np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-13)


def test_objective_term_full_sparse_and_fused_routes_agree(rng):
  b, t, v, h = 2, 5, 13, 6
  hs, ht = rng.standard_normal((b, t, h)), rng.standard_normal((b, t, h))
  ws, wt = rng.standard_normal((h, v)), rng.standard_normal((h, v))
  labels = np.array([[1, 2, 3, -100, -100], [4, 5, 6, 7, 8]])
  zs, zt = hs @ ws, ht @ wt
  obj = losses.build_objective({"bd": {"term": "balanced_kl", "temperature": 2.0}})
  fused = losses.build_objective({"bd": {"term": "balanced_kl", "temperature": 2.0,
                                         "fused": True, "chunk_size": 4}})
  order = np.argsort(-zt, axis=-1)
  full_in = dict(student_logits=zs, teacher_logits=zt, labels=labels)
  sparse_in = dict(student_logits=zs, labels=labels, teacher_topk_ids=order,
                   teacher_topk_logprobs=np.take_along_axis(ref.log_softmax(zt), order, -1))
  fused_in = dict(student_hidden=hs, student_head=ws, teacher_hidden=ht, teacher_head=wt,
                  labels=labels)
  mask = labels != -100
  want = ref.full_divergence("balanced_kl", zs, zt, temperature=2.0)[mask].mean()
  cast = lambda d: jax.tree.map(  # noqa: E731
      lambda x: x.astype(np.float32) if x.dtype == np.float64 else x, d)
  values = jit(lambda a, b, c: [obj(a)[1]["loss/bd"], obj(b)[1]["loss/bd"],
                                fused(c)[1]["loss/bd"]])(
      cast(full_in), cast(sparse_in), cast(fused_in))
  np.testing.assert_allclose(values, [want] * 3, rtol=1e-5)

  def grads(o, inputs):
    def f(s_hidden, s_head):
      return o(dict(cast(inputs), student_hidden=s_hidden, student_head=s_head,
                    student_logits=s_hidden @ s_head))[0]
    return jit(jax.grad(f, argnums=(0, 1)))(hs.astype(np.float32), ws.astype(np.float32))
  for a, c in zip(grads(obj, full_in), grads(fused, fused_in)):
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-6)


def test_a_certain_model_picks_one_kl():
  """A (nearly) one-hot teacher, H(p) ~ 0, gives reverse KL; a one-hot student forward KL.
  Exactly one-hot models give +inf where a KL is infinite, never NaN, and 0 when they agree."""
  f = jit(lambda a, b: [losses.balanced_kl(a, b), losses.forward_kl(a, b),
                        losses.reverse_kl(a, b)])
  flat = np.array([[0.3, 0.0, -0.2]], np.float32)
  certain = np.array([[0.0, -30.0, -30.0]], np.float32)  # entropy ~ 6e-12
  bd, _, rkl = f(flat, certain)
  np.testing.assert_allclose(bd, rkl, rtol=1e-6)
  bd, fkl, _ = f(certain, flat)
  np.testing.assert_allclose(bd, fkl, rtol=1e-6)
  inf = np.inf
  one_hot = np.array([[0.0, -inf, -inf], [0.0, -inf, -inf]], np.float32)
  other = np.array([[0.0, -inf, -inf], [-inf, 0.0, -inf]], np.float32)
  bd, _, _ = f(one_hot, other)
  np.testing.assert_array_equal(bd, [0.0, inf])
  bd, _, _ = f(np.concatenate([certain, flat]), one_hot)  # teacher one-hot: reverse KL
  np.testing.assert_array_equal(bd, [inf, inf])
