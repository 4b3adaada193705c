"""Preference terms of the objective registry: routing, metrics and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses


def _logps(key, b=4):
  k = jax.random.split(key, 2)
  s = -jax.random.uniform(k[0], (b,), minval=5.0, maxval=20.0)
  n = jax.random.randint(k[1], (b,), 3, 9).astype(jnp.int32)
  return losses.SequenceLogprobs(sum=s, mean=s / n, count=n)


@pytest.fixture
def pairs():
  keys = jax.random.split(jax.random.key(0), 4)
  return dict(zip(("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"),
                  (_logps(k) for k in keys)))


def _logsig(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def test_dpo_term_matches_numpy_and_logs_rewards(pairs):
  obj = losses.build_objective({"dpo": {"beta": 0.2, "loss_type": ["sigmoid", "ipo"],
                                        "loss_weights": [1.0, 0.5]}})
  total, metrics = jax.jit(lambda p: obj(p))(pairs)
  pc, pr, rc, rr = (np.asarray(pairs[k].sum, np.float64) for k in
                    ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"))
  mc, mr, mrc, mrr = (np.asarray(pairs[k].mean, np.float64) for k in
                      ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"))
  h = (pc - rc) - (pr - rr)
  h_avg = (mc - mrc) - (mr - mrr)
  expect = np.mean(-_logsig(0.2 * h) + 0.5 * (h_avg - 1 / (2 * 0.2)) ** 2)
  np.testing.assert_allclose(total, expect, rtol=1e-5)
  np.testing.assert_allclose(metrics["dpo/rewards/margins"], np.mean(0.2 * h), rtol=1e-5)
  np.testing.assert_allclose(metrics["dpo/rewards/accuracies"], np.mean(h > 0))


def test_reference_free_terms(pairs):
  obj = losses.build_objective({"simpo": 1.0, "orpo": {"lam": 0.2}, "redi": 0.5, "cpo": 0.1})
  total, m = obj(pairs)
  mc, mr = (np.asarray(pairs[k].mean, np.float64) for k in ("policy_chosen", "policy_rejected"))
  simpo = np.mean(-_logsig(2.0 * (mc - mr) - 0.5))
  np.testing.assert_allclose(m["loss/simpo"], simpo, rtol=1e-5)
  log_odds = (mc - mr) - (np.log1p(-np.exp(mc)) - np.log1p(-np.exp(mr)))
  np.testing.assert_allclose(m["loss/orpo"], np.mean(-mc - 0.2 * _logsig(log_odds)), rtol=1e-5)
  np.testing.assert_allclose(m["loss/redi"], np.mean(-mc + 0.8 * mr), rtol=1e-5)
  assert "orpo/log_odds_ratio" in m and np.isfinite(total)


def test_kto_term(pairs):
  p, r = pairs["policy_chosen"], pairs["ref_chosen"]
  inputs = dict(policy=p, ref=r, desirable=jnp.array([True, False, True, False]),
                policy_kl=pairs["policy_rejected"], ref_kl=pairs["ref_rejected"])
  total, m = losses.build_objective({"kto": {"beta": 0.1}})(inputs)
  z = max(0.0, float(np.mean(np.asarray(pairs["policy_rejected"].sum, np.float64)
                             - np.asarray(pairs["ref_rejected"].sum, np.float64))))
  ratio = np.asarray(p.sum, np.float64) - np.asarray(r.sum, np.float64)
  sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
  per = np.where(np.array([True, False, True, False]), 1 - sig(0.1 * (ratio - z)),
                 1 - sig(0.1 * (z - ratio)))
  np.testing.assert_allclose(total, per.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["kto/kl"], z, rtol=1e-5, atol=1e-6)


def test_errors(pairs):
  with pytest.raises(ValueError, match="needs the inputs.*missing \\['ref_chosen', 'ref_rejected'\\]"):
    losses.build_objective({"dpo": 1.0})({k: pairs[k] for k in ("policy_chosen", "policy_rejected")})
  with pytest.raises(TypeError, match="length-averaged"):
    losses.build_objective({"simpo": 1.0})({"policy_chosen": jnp.zeros(2),
                                            "policy_rejected": jnp.zeros(2)})
  with pytest.raises(ValueError, match="did you mean 'beta'"):
    losses.build_objective({"dpo": {"betta": 0.1}})
  with pytest.raises(ValueError, match="unknown preference loss type 'sigmod'"):
    losses.build_objective({"dpo": {"loss_type": "sigmod"}})
  with pytest.raises(ValueError, match="beta must be > 0"):
    losses.build_objective({"simpo": {"beta": 0.0}})
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.build_objective({"dpo": {"loss_type": "robust", "label_smoothing": 0.5}})
