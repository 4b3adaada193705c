"""Sequence log-probs and TRL's DPO loss types (jkd.losses.sequences, jkd.losses.dpo), their
combination (``preference_loss``) and metrics, against the float64 NumPy references of
reference_preference.py.

Every library function runs under ``jax.jit``, options bound by closures. Gradients are taken
wrt the policy's log-probs and compared with central differences of the reference.
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
from jkd.losses import dpo
from jkd.losses import sequences

B = 8  # pairs in the random batches (as many as extreme_four(): one compilation)
NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
         "ref_rejected_logps")

#: TRL loss type -> the library function.
LIB = {
    "sigmoid": dpo.dpo_loss,
    "robust": dpo.robust_dpo_loss,
    "ipo": dpo.ipo_loss,
    "hinge": dpo.hinge_loss,
    "exo_pair": dpo.exo_pair_loss,
    "nca_pair": dpo.nca_pair_loss,
    "bco_pair": dpo.bco_pair_loss,
    "sppo_hard": dpo.sppo_hard_loss,
    "aot": dpo.aot_loss,
    "aot_unpaired": dpo.aot_unpaired_loss,
    "apo_zero": dpo.apo_zero_loss,
    "apo_down": dpo.apo_down_loss,
    "discopop": dpo.discopop_loss,
    "sigmoid_norm": dpo.sigmoid_norm_loss,
    "sft": dpo.sft_loss,
}
WITH_BETA = [n for n in LIB if n != "sft"]

#: (case id, loss type, options): label smoothing 0 and > 0 where a type takes it.
CASES = [
    ("sigmoid", "sigmoid", {"beta": 0.1}),
    ("sigmoid-ls0.2-b1", "sigmoid", {"beta": 1.0, "label_smoothing": 0.2}),
    ("sigmoid-ls0.5", "sigmoid", {"beta": 0.1, "label_smoothing": 0.5}),
    ("robust-ls0", "robust", {"beta": 0.1, "label_smoothing": 0.0}),
    ("robust-ls0.2-b0.5", "robust", {"beta": 0.5, "label_smoothing": 0.2}),
    ("ipo", "ipo", {"beta": 0.1}),
    ("hinge", "hinge", {"beta": 0.1}),
    ("exo_pair", "exo_pair", {"beta": 0.1}),
    ("exo_pair-ls0.3-b0.5", "exo_pair", {"beta": 0.5, "label_smoothing": 0.3}),
    ("nca_pair", "nca_pair", {"beta": 0.1}),
    ("bco_pair", "bco_pair", {"beta": 0.1}),
    ("bco_pair-delta0.3-b0.5", "bco_pair", {"beta": 0.5, "delta": 0.3}),
    ("sppo_hard", "sppo_hard", {"beta": 0.1}),
    ("aot", "aot", {"beta": 0.1}),
    ("aot-ls0.2-b0.5", "aot", {"beta": 0.5, "label_smoothing": 0.2}),
    ("aot_unpaired", "aot_unpaired", {"beta": 0.1}),
    ("aot_unpaired-ls0.2-b0.5", "aot_unpaired", {"beta": 0.5, "label_smoothing": 0.2}),
    ("apo_zero", "apo_zero", {"beta": 0.1}),
    ("apo_down", "apo_down", {"beta": 0.1}),
    ("discopop", "discopop", {"beta": 0.1}),
    ("discopop-tau0.5-b0.5", "discopop", {"beta": 0.5, "tau": 0.5}),
    ("sigmoid_norm", "sigmoid_norm", {"beta": 0.1}),
    ("sft", "sft", {}),
]
CASE_IDS = [c[0] for c in CASES]


def four_logps(rng, n=B, low=-60.0, high=-5.0):
  """Random summed log-probs (pc, pr, rc, rr), float32 ``[n]``."""
  return tuple(rng.uniform(low, high, n).astype(np.float32) for _ in range(4))


def extreme_four():
  """Log-probs near 0 (-1e-6) and very negative (-1e4): margins ``beta * h`` up to 2000.

  Chosen so that none of ``pc - pr``, ``rc - rr``, ``pc - rc``, ``pr - rr`` has ties within the
  batch (AOT sorts them: a tie makes the gradient ill-defined).
  """
  t, g = -1e-6, -1e4
  rows = [  # (pc, pr, rc, rr)
      (t, g, g, t),                    # h = +2e4
      (g - 1, t, 2 * t, g),            # h = -2e4
      (t, 2 * t, 3 * t, 4 * t),        # everything ~ 0, h ~ 0
      (g + 3, g + 1, g - 2, g - 0.5),  # large log-probs, small margins
      (-5e3, t, t, -9e3),              # h = -1.4e4
      (t, -3.0, -8e3, -2.0),           # h = +8e3
      (-2e3, -1e-7, t, -3e3),          # h = -5e3
      (-7.0, -9e3, g + 10, t),         # h = +1.9e4
  ]
  return tuple(np.array(col, np.float32) for col in zip(*rows))


def assert_close(actual, expected, *, rtol=2e-5, atol=2e-5):
  actual = np.asarray(actual)
  assert np.isfinite(actual).all(), f"non-finite values in {actual}"
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@functools.cache
def _all_cases():
  """One jitted function: every case's per-pair losses and the gradient of their sum wrt the
  policy's chosen and rejected log-probs (compiled once per input shape)."""
  def run(pc, pr, rc, rr):
    out = {}
    for cid, name, options in CASES:
      f = functools.partial(LIB[name], **options)
      values, vjp = jax.vjp(lambda a, b: f(a, b, rc, rr), pc, pr)
      out[cid] = (values, vjp(jnp.ones_like(values)))
    return out
  return jax.jit(run)


def ref_grads(name, options, pc, pr, rc, rr):
  """Central differences of the reference's summed loss wrt pc and pr."""
  f = functools.partial(rp.trl_loss, name, **options)
  return (rp.numerical_grad(lambda x: f(x, pr, rc, rr), pc),
          rp.numerical_grad(lambda x: f(pc, x, rc, rr), pr))


# ----------------------------------------------------------------------------------------------
# TRL loss types: values and gradients.
# ----------------------------------------------------------------------------------------------

def test_every_trl_type_is_covered():
  assert set(LIB) == set(rp.TRL_LOSSES) == set(dpo.PREFERENCE_LOSSES)
  assert {c[1] for c in CASES} == set(LIB)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_values_and_grads_match_reference(case, rng):
  cid, name, options = case
  pc, pr, rc, rr = four_logps(rng)
  values, (g_pc, g_pr) = _all_cases()(pc, pr, rc, rr)[cid]
  assert values.shape == (B,) and values.dtype == jnp.float32
  assert_close(values, rp.trl_loss(name, pc, pr, rc, rr, **options))
  want_pc, want_pr = ref_grads(name, options, pc, pr, rc, rr)
  assert_close(g_pc, want_pc, rtol=1e-4, atol=1e-5)
  assert_close(g_pr, want_pr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_extreme_inputs(case):
  """Log-probs of -1e-6 and -1e4: finite values and gradients, equal to the reference."""
  cid, name, options = case
  pc, pr, rc, rr = extreme_four()
  values, (g_pc, g_pr) = _all_cases()(pc, pr, rc, rr)[cid]
  assert_close(values, rp.trl_loss(name, pc, pr, rc, rr, **options), rtol=1e-5, atol=2e-4)
  want_pc, want_pr = ref_grads(name, options, pc, pr, rc, rr)
  assert_close(g_pc, want_pc, rtol=1e-4, atol=1e-5)
  assert_close(g_pr, want_pr, rtol=1e-4, atol=1e-5)


def test_dpo_grad_is_the_analytic_one(rng):
  """``d/dpc = -beta [(1-e) s(-beta h) - e s(beta h)] = -d/dpr`` and ``-d/drc``."""
  pc, pr, rc, rr = four_logps(rng)
  beta, e = 0.3, 0.15
  f = jax.jit(jax.grad(lambda *a: jnp.sum(dpo.dpo_loss(*a, beta=beta, label_smoothing=e)),
                       argnums=(0, 1, 2, 3)))
  grads = f(pc, pr, rc, rr)
  h = (rp.f64(pc) - rc) - (rp.f64(pr) - rr)
  want = -beta * ((1 - e) * rp.sigmoid(-beta * h) - e * rp.sigmoid(beta * h))
  for g, sign in zip(grads, (1, -1, -1, 1)):
    assert_close(g, sign * want, rtol=1e-5, atol=1e-7)


def test_check_grads_float64(rng):
  """Autodiff vs finite differences in float64, every loss type (its first case), wrt all four
  log-prob arrays. (Run eagerly: compiling the float64 function and its VJP costs more.)"""
  cases = list({name: (name, options) for _, name, options in reversed(CASES)}.values())
  with jax.enable_x64(True):
    pc, pr, rc, rr = (jnp.asarray(rng.uniform(-20.0, -2.0, 5)) for _ in range(4))
    h = (pc - rc) - (pr - rr)
    assert float(jnp.min(jnp.abs(1 - 0.1 * h))) > 1e-3  # away from the hinge's kink
    f = lambda *a: jnp.stack([LIB[name](*a, **options) for name, options in cases])
    assert f(pc, pr, rc, rr).dtype == jnp.float64
    check_grads(f, (pc, pr, rc, rr), order=1, modes=["rev"])


def test_bf16_inputs_compute_in_float32(rng):
  args = [jnp.asarray(x, jnp.bfloat16) for x in four_logps(rng)]
  out = jax.jit(functools.partial(dpo.dpo_loss, beta=0.1))(*args)
  assert out.dtype == jnp.float32
  assert_close(out, rp.sigmoid_loss(*[np.asarray(a, np.float32) for a in args]), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Documented limits and symmetries.
# ----------------------------------------------------------------------------------------------

def test_robust_with_zero_noise_is_dpo(rng):
  args = four_logps(rng)
  robust = jax.jit(functools.partial(dpo.robust_dpo_loss, beta=0.2, label_smoothing=0.0))
  plain = jax.jit(functools.partial(dpo.dpo_loss, beta=0.2))
  np.testing.assert_allclose(robust(*args), plain(*args), rtol=1e-6)


def test_robust_is_unbiased_under_label_flips(rng):
  """rDPO's defining property: ``(1-e) L(h) + e L(-h)`` (a label flipped with probability ``e``)
  is the clean DPO loss."""
  pc, pr, rc, rr = four_logps(rng)
  e = 0.3
  robust = jax.jit(functools.partial(dpo.robust_dpo_loss, beta=0.2, label_smoothing=e))
  expected = (1 - e) * robust(pc, pr, rc, rr) + e * robust(pr, pc, rr, rc)
  assert_close(expected, rp.sigmoid_loss(pc, pr, rc, rr, beta=0.2), rtol=1e-5)


def test_cdpo_with_half_smoothing_is_symmetric(rng):
  pc, pr, rc, rr = four_logps(rng)
  f = jax.jit(functools.partial(dpo.dpo_loss, beta=0.2, label_smoothing=0.5))
  np.testing.assert_allclose(f(pc, pr, rc, rr), f(pr, pc, rr, rc), rtol=1e-6)
  assert np.all(np.asarray(f(pc, pr, rc, rr)) >= math.log(2) - 1e-6)  # minimum at h = 0


def test_exo_swapping_the_pair_swaps_the_smoothing(rng):
  pc, pr, rc, rr = four_logps(rng)
  exo = lambda e: jax.jit(functools.partial(dpo.exo_pair_loss, beta=0.2,
                                            label_smoothing=e))
  assert_close(exo(0.3)(pc, pr, rc, rr), exo(0.7)(pr, pc, rr, rc), rtol=1e-5, atol=1e-6)
  # A KL divergence: >= 0, and 0 at h = 0 with e = 1/2.
  assert np.all(np.asarray(exo(0.3)(pc, pr, rc, rr)) >= -1e-6)
  z = jnp.zeros(3)
  np.testing.assert_allclose(exo(0.5)(z, z, z, z), 0.0, atol=1e-7)


def test_zero_margins():
  z = jnp.zeros(2)
  beta = 0.25
  expected = {"sigmoid": math.log(2), "robust": math.log(2), "ipo": (1 / (2 * beta)) ** 2,
              "hinge": 1.0, "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2),
              "sppo_hard": 2 * (0.5 / beta) ** 2, "aot": math.log(2),
              "aot_unpaired": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
              "discopop": (math.log(2) + 1) / 2, "sigmoid_norm": math.log(2), "sft": 0.0}
  for name, want in expected.items():
    kwargs = {} if name == "sft" else {"beta": beta}
    if name == "robust":
      kwargs["label_smoothing"] = 0.2
    np.testing.assert_allclose(LIB[name](z, z, z, z, **kwargs), want, rtol=1e-6, err_msg=name)
  # IPO is 0 at its target margin 1 / (2 beta).
  one = jnp.full(2, 1 / (2 * beta))
  np.testing.assert_allclose(dpo.ipo_loss(one, z, z, z, beta=beta), 0.0, atol=1e-7)


def test_aot_sorts_over_the_batch(rng):
  """AOT compares quantiles: permuting the pairs does not change the (sorted) losses."""
  args = four_logps(rng)
  perm = rng.permutation(B)
  for fn in (dpo.aot_loss, dpo.aot_unpaired_loss):
    f = jax.jit(functools.partial(fn, beta=0.2))
    np.testing.assert_allclose(f(*args), f(*[a[perm] for a in args]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Sequence log-probs.
# ----------------------------------------------------------------------------------------------

SEQ_B, SEQ_T, SEQ_V = 3, 7, 11


def seq_inputs(rng, b=SEQ_B, t=SEQ_T, v=SEQ_V):
  """Logits, labels with a prompt and right padding (``-100``), and a ``where`` mask."""
  logits = (rng.standard_normal((b, t, v)) * 3.0).astype(np.float32)
  labels = rng.integers(0, v, (b, t)).astype(np.int32)
  for i, (prompt, pad) in enumerate([(2, 0), (1, 2), (3, 1)][:b]):
    labels[i, :prompt] = -100
    labels[i, t - pad:] = -100
  where = rng.random((b, t)) < 0.8
  where[:, 3] = True  # position 3 is a completion token of every sequence
  return logits, labels, where


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True], ids=["labels", "labels+where"])
def test_sequence_logprobs_match_reference(masked, temperature, rng):
  logits, labels, where = seq_inputs(rng)
  where = where if masked else None
  f = jax.jit(functools.partial(sequences.sequence_logprobs, temperature=temperature))
  out = f(logits, labels, where=where)
  total, mean, count = rp.sequence_logprobs(logits, labels, where=where,
                                            temperature=temperature)
  assert isinstance(out, sequences.SequenceLogprobs)
  assert out.sum.shape == out.mean.shape == out.count.shape == (SEQ_B,)
  assert_close(out.sum, total, rtol=1e-5, atol=1e-5)
  assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.count, count)


def test_sequence_logprobs_mask_equivalence(rng):
  """Masking positions with ``where`` equals dropping them, and equals ``ignore_index``."""
  logits, labels, _ = seq_inputs(rng)
  keep = np.array([True, False, True, True, False, True, True])
  f = jax.jit(sequences.sequence_logprobs)
  dropped = f(logits[:, keep], labels[:, keep])
  masked = f(logits, labels, where=np.broadcast_to(keep, labels.shape))
  ignored = f(logits, np.where(keep, labels, -100))
  for other in (masked, ignored):
    for a, b in zip(dropped, other):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # Another ignore_index value.
  custom = jax.jit(functools.partial(sequences.sequence_logprobs, ignore_index=-1))(
      logits, np.where(keep & (labels != -100), labels, -1))
  for a, b in zip(dropped, custom):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sequence_logprobs_extreme_logits_and_gradient(rng):
  """Banned tokens (-inf), logits of +-1e4, and garbage (NaN, inf) at masked positions: finite
  values and gradient; the gradient of ``sum`` is ``onehot(y) - softmax(z)`` at counted
  positions and 0 elsewhere."""
  logits, labels, where = seq_inputs(rng)
  logits[0, 3] *= 3e3  # logits of size ~1e4
  counted = (labels != -100) & where
  banned = (rng.random(logits.shape) < 0.3) & (np.arange(SEQ_V) != np.where(
      labels >= 0, labels, 0)[..., None])
  logits[banned] = -np.inf
  logits[~counted] = np.nan
  logits[~counted, 0] = np.inf

  def f(z):
    out = sequences.sequence_logprobs(z, labels, where=where)
    return jnp.sum(out.sum) + jnp.sum(out.mean), out
  (_, out), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logits)
  total, mean, _ = rp.sequence_logprobs(logits, labels, where=where)
  assert_close(out.sum, total, rtol=1e-5, atol=1e-4)
  assert_close(out.mean, mean, rtol=1e-5, atol=1e-4)
  grad = np.asarray(grad)
  assert np.isfinite(grad).all()
  count = counted.sum(-1)
  want = np.zeros(logits.shape)
  for b, t in zip(*np.nonzero(counted)):
    onehot = np.eye(SEQ_V)[labels[b, t]]
    want[b, t] = (onehot - np.exp(rp.log_softmax(logits[b, t]))) * (1 + 1 / count[b])
  np.testing.assert_allclose(grad, want, atol=1e-5)


def test_empty_completion(rng):
  logits, labels, _ = seq_inputs(rng)
  labels[1] = -100
  with pytest.raises(ValueError, match=r"sequence_logprobs: sequence\(s\) \[1\] have no"
                     r" completion token"):
    sequences.sequence_logprobs(logits, labels)
  where = np.ones(labels.shape, bool)
  where[2] = False
  with pytest.raises(ValueError, match=r"sequence\(s\) \[1, 2\]"):
    sequences.sequence_logprobs(logits, labels, where=where)
  # Under jit the check cannot run: the mean is NaN (documented), the sum 0, the count 0.
  out = jax.jit(sequences.sequence_logprobs)(logits, labels)
  assert np.isnan(out.mean[1]) and float(out.sum[1]) == 0.0 and int(out.count[1]) == 0
  assert np.isfinite(np.asarray(out.mean)[[0, 2]]).all()
  hidden, head = np.ones((SEQ_B, SEQ_T, 2), np.float32), np.ones((2, SEQ_V), np.float32)
  with pytest.raises(ValueError, match=r"fused_sequence_logprobs: sequence\(s\) \[1\]"):
    sequences.fused_sequence_logprobs(hidden, head, labels)


def test_sequence_logprobs_bad_labels(rng):
  logits, labels, _ = seq_inputs(rng)
  bad = labels.copy()
  bad[0, 4] = SEQ_V
  with pytest.raises(ValueError, match="outside the vocabulary"):
    sequences.sequence_logprobs(logits, bad)
  with pytest.raises(ValueError, match="labels shape"):
    sequences.sequence_logprobs(logits, labels[:, 1:])
  with pytest.raises(TypeError, match="integer token ids"):
    sequences.sequence_logprobs(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match="where has shape"):
    sequences.sequence_logprobs(logits, labels, where=np.ones((SEQ_B, 2), bool))


# ----------------------------------------------------------------------------------------------
# Fused (chunked) sequence log-probs.
# ----------------------------------------------------------------------------------------------

F_PAIRS, F_T, F_H, F_HR, F_V = 2, 5, 6, 4, 13  # 4 sequences x 5 = 20 tokens
F_CHUNK = 3  # 20 is not a multiple of 3


def fused_inputs(rng):
  hidden = (rng.standard_normal((2 * F_PAIRS, F_T, F_H)) / np.sqrt(F_H)).astype(np.float32)
  head = (rng.standard_normal((F_H, F_V)) * 2.0).astype(np.float32)
  ref_hidden = (rng.standard_normal((2 * F_PAIRS, F_T, F_HR)) / np.sqrt(F_HR)).astype(np.float32)
  ref_head = (rng.standard_normal((F_HR, F_V)) * 2.0).astype(np.float32)
  labels = rng.integers(0, F_V, (2 * F_PAIRS, F_T)).astype(np.int32)
  labels[:, 0] = -100
  labels[1, -2:] = -100
  where = np.ones(labels.shape, bool)
  where[2, 1] = False
  return hidden, head, ref_hidden, ref_head, labels, where


def _pair_loss(policy, reference):
  """Mean DPO on the summed log-probs plus IPO on the averaged ones (both paths of the fused
  backward: ``sum`` and ``mean``). Sequences ``[:P]`` are the chosen, ``[P:]`` the rejected."""
  p = F_PAIRS
  dpo_values = dpo.dpo_loss(policy.sum[:p], policy.sum[p:], reference.sum[:p],
                            reference.sum[p:], beta=0.5)
  ipo = dpo.ipo_loss(policy.mean[:p], policy.mean[p:], reference.mean[:p],
                     reference.mean[p:], beta=0.5)
  return jnp.mean(dpo_values + ipo)


@functools.cache
def _fused_and_unfused():
  def fused(hidden, head, ref_hidden, ref_head, labels, where):
    policy, reference = sequences.fused_sequence_logprobs(
        hidden, head, labels, where=where, chunk_size=F_CHUNK, reference_hidden=ref_hidden,
        reference_head=ref_head)
    return _pair_loss(policy, reference), (policy, reference)

  def unfused(hidden, head, ref_hidden, ref_head, labels, where):
    policy = sequences.sequence_logprobs(hidden @ head, labels, where=where)
    reference = sequences.sequence_logprobs(jax.lax.stop_gradient(ref_hidden @ ref_head),
                                             labels, where=where)
    return _pair_loss(policy, reference), (policy, reference)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
  return grad(fused), grad(unfused)


def test_fused_sequence_logprobs_equal_unfused(rng):
  inputs = fused_inputs(rng)
  fused, unfused = _fused_and_unfused()
  (loss_f, (pol_f, ref_f)), grads_f = fused(*inputs)
  (loss_u, (pol_u, ref_u)), grads_u = unfused(*inputs)
  np.testing.assert_allclose(loss_f, loss_u, rtol=1e-5)
  for a, b in zip(pol_f + ref_f, pol_u + ref_u):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # And the reference's numbers.
  hidden, head, ref_hidden, ref_head, labels, where = inputs
  for out, h, w in ((pol_f, hidden, head), (ref_f, ref_hidden, ref_head)):
    total, mean, count = rp.sequence_logprobs(rp.f64(h) @ w, labels, where=where)
    assert_close(out.sum, total, rtol=1e-5, atol=1e-5)
    assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.count, count)
  # Gradients wrt the policy's hidden states and head; the reference gets none.
  assert_close(grads_f[0], grads_u[0], rtol=1e-4, atol=1e-6)
  assert_close(grads_f[1], grads_u[1], rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(grads_f[0])).max() > 1e-3
  np.testing.assert_array_equal(grads_f[2], 0.0)
  np.testing.assert_array_equal(grads_f[3], 0.0)


def test_fused_sequence_logprobs_policy_only(rng):
  hidden, head, _, _, labels, where = fused_inputs(rng)
  for chunk in (1, 7, 64):  # one token per chunk, a ragged last chunk, one chunk for all
    f = jax.jit(functools.partial(sequences.fused_sequence_logprobs, chunk_size=chunk))
    out = f(hidden, head, labels, where=where)
    assert isinstance(out, sequences.SequenceLogprobs)
    total, mean, _ = rp.sequence_logprobs(rp.f64(hidden) @ head, labels, where=where)
    assert_close(out.sum, total, rtol=1e-5, atol=1e-5)
    assert_close(out.mean, mean, rtol=1e-5, atol=1e-5)


def test_fused_sequence_logprobs_bad_input(rng):
  hidden, head, ref_hidden, ref_head, labels, _ = fused_inputs(rng)
  f = sequences.fused_sequence_logprobs
  with pytest.raises(ValueError, match="both reference_hidden and reference_head"):
    f(hidden, head, labels, reference_hidden=ref_hidden)
  with pytest.raises(ValueError, match="reference vocab 5 != policy vocab 13"):
    f(hidden, head, labels, reference_hidden=ref_hidden, reference_head=ref_head[:, :5])
  with pytest.raises(ValueError, match="reference_hidden positions"):
    f(hidden, head, labels, reference_hidden=ref_hidden[:, 1:], reference_head=ref_head)
  with pytest.raises(ValueError, match="labels shape"):
    f(hidden, head, labels[:, 1:])
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    f(hidden, head, labels, chunk_size=0)
  with pytest.raises(ValueError, match="must be \\[N, H\\] and \\[H, V\\]"):
    f(hidden, head[1:], labels)


# ----------------------------------------------------------------------------------------------
# preference_loss: TRL's loss_type (list) with weights.
# ----------------------------------------------------------------------------------------------

def random_sequence_logprobs(rng):
  """Four SequenceLogprobs whose ``sum`` and ``mean`` differ (to catch a wrong pick)."""
  out = []
  for _ in range(4):
    count = rng.integers(2, 30, B).astype(np.int32)
    mean = rng.uniform(-3.0, -0.1, B).astype(np.float32)
    out.append(sequences.SequenceLogprobs(sum=(mean * count).astype(np.float32), mean=mean,
                                           count=count))
  return out


@functools.cache
def _every_type_by_name():
  def run(pc, pr, rc, rr):
    return {name: dpo.preference_loss(pc, pr, rc, rr, loss_type=name, beta=0.3)
            for name in LIB}
  return jax.jit(run)


@pytest.mark.parametrize("name", list(LIB))
def test_preference_loss_picks_sum_or_mean(name, rng):
  seqs = random_sequence_logprobs(rng)
  out = _every_type_by_name()(*seqs)[name]
  fn, averaged = rp.TRL_LOSSES[name]
  picked = [s.mean if averaged else s.sum for s in seqs]
  options = {} if name == "sft" else {"beta": 0.3}
  assert_close(out, fn(*picked, **options), rtol=1e-5, atol=1e-5)


def test_preference_loss_weighted_list(rng):
  seqs = random_sequence_logprobs(rng)
  types = ["sigmoid", "ipo", "sft", "hinge", "robust", "bco_pair"]
  weights = [1.0, 0.5, 0.2, 2.0, 0.7, 0.4]
  options = {"robust": {"label_smoothing": 0.2}, "bco_pair": {"beta": 0.05}}

  @jax.jit
  def run(pc, pr, rc, rr):
    combined = dpo.preference_loss(pc, pr, rc, rr, loss_type=types, loss_weights=weights,
                                         options=options, beta=0.3, label_smoothing=0.1,
                                         delta=0.2)
    singles = [dpo.preference_loss(pc, pr, rc, rr, loss_type=t, beta=0.3,
                                         label_smoothing=0.1, delta=0.2,
                                         options={t: options[t]} if t in options else None)
               for t in types]
    return combined, singles
  combined, singles = run(*seqs)
  np.testing.assert_allclose(combined, sum(w * s for w, s in zip(weights, singles)), rtol=1e-5)
  s, m = [x.sum for x in seqs], [x.mean for x in seqs]
  # Shared options go to the types that take them; per-type options override them.
  expected = (rp.sigmoid_loss(*s, beta=0.3, label_smoothing=0.1)
              + 0.5 * rp.ipo_loss(*m, beta=0.3) + 0.2 * rp.sft_loss(*m)
              + 2.0 * rp.hinge_loss(*s, beta=0.3)
              + 0.7 * rp.robust_loss(*s, beta=0.3, label_smoothing=0.2)
              + 0.4 * rp.bco_pair_loss(*s, beta=0.05, delta=0.2))
  assert_close(combined, expected, rtol=1e-5, atol=1e-5)


def test_preference_loss_plain_arrays(rng):
  args = four_logps(rng)
  f = jax.jit(functools.partial(dpo.preference_loss, loss_type=["sigmoid", "hinge"],
                                beta=0.2))
  assert_close(f(*args), rp.sigmoid_loss(*args, beta=0.2) + rp.hinge_loss(*args, beta=0.2))
  for loss_type in ("ipo", "sigmoid_norm", "sft", ["sigmoid", "ipo"]):
    with pytest.raises(TypeError, match="needs length-averaged log-probs; pass the"
                       " SequenceLogprobs"):
      dpo.preference_loss(*args, loss_type=loss_type)


def test_preference_loss_bad_arguments(rng):
  args = four_logps(rng)
  f = dpo.preference_loss
  with pytest.raises(ValueError, match=r"unknown preference loss type 'sigmod' \(did you mean"
                     r" 'sigmoid'\?\); choose from \["):
    f(*args, loss_type="sigmod")
  with pytest.raises(ValueError, match=r"unknown preference loss type 'apo_up' \(did you mean"
                     r" 'apo_(zero|down)'\?\)"):
    f(*args, loss_type=["sigmoid", "apo_up"])
  with pytest.raises(ValueError, match="loss_type is empty"):
    f(*args, loss_type=[])
  with pytest.raises(ValueError, match="1 loss_weights for 2 loss types"):
    f(*args, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
  with pytest.raises(ValueError, match=r"options given for \['ipo'\], which are not in"
                     " loss_type"):
    f(*args, loss_type="sigmoid", options={"ipo": {"beta": 0.1}})
  with pytest.raises(ValueError, match=r"loss type 'hinge' takes no option\(s\)"
                     r" \['label_smoothing'\]"):
    f(*args, loss_type="hinge", options={"hinge": {"label_smoothing": 0.1}})
  with pytest.raises(ValueError, match="beta must be > 0"):
    f(*args, loss_type=["hinge"], beta=0.0)


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------

def test_preference_metrics_match_reference(rng):
  pc, pr, rc, rr = four_logps(rng, n=8)
  pr[:3] = pc[:3] - 1.0  # some pairs the policy already prefers
  f = jax.jit(functools.partial(dpo.preference_metrics, beta=0.2))
  for got, want in ((f(pc, pr, rc, rr), rp.preference_metrics(pc, pr, rc, rr, beta=0.2)),
                    (f(pc, pr), rp.preference_metrics(pc, pr, beta=0.2))):
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Metrics carry no gradient.
  grads = jax.grad(lambda a, b: sum(jax.tree.leaves(f(a, b, rc, rr))), argnums=(0, 1))(pc, pr)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_preference_metrics_bad_input(rng):
  pc, pr, rc, rr = four_logps(rng)
  f = dpo.preference_metrics
  with pytest.raises(ValueError, match="ref_chosen_logps has shape"):
    f(pc, pr, rc[:1], rr)
  with pytest.raises(ValueError, match="ref_rejected_logps has shape"):
    f(pc, pr, rc, rr[:3])
  with pytest.raises(ValueError, match="policy_rejected_logps has shape"):
    f(pc, pr[:3])
  with pytest.raises(ValueError, match="beta must be > 0"):
    f(pc, pr, beta=-1.0)


# ----------------------------------------------------------------------------------------------
# Bad input to the losses.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in LIB if n != "sft"])
def test_mismatched_batch_shapes(name, rng):
  args = list(four_logps(rng))
  for i in range(1, 4):
    bad = list(args)
    bad[i] = args[i][:-1]
    with pytest.raises(ValueError, match=rf"{NAMES[i]} has shape \({B - 1},\) but"
                       rf" policy_chosen_logps has \({B},\)"):
      LIB[name](*bad)
  bad = list(args)
  bad[0] = args[0][:, None]
  with pytest.raises(ValueError, match=r"policy_chosen_logps must be per-sequence log-probs of"
                     r" shape \[batch\]"):
    LIB[name](*bad)
  bad = list(args)
  bad[2] = args[2].astype(np.int32)
  with pytest.raises(TypeError, match="ref_chosen_logps must be a floating-point array"):
    LIB[name](*bad)


@pytest.mark.parametrize("name", WITH_BETA)
def test_beta_must_be_positive(name, rng):
  args = four_logps(rng)
  for beta in (0.0, -0.1, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="beta must be > 0"):
      LIB[name](*args, beta=beta)
  with pytest.raises(TypeError, match="beta must be a Python number"):
    LIB[name](*args, beta="0.1")


def test_label_smoothing_range(rng):
  args = four_logps(rng)
  for e in (0.5, 0.7, 1.0):
    with pytest.raises(ValueError, match=rf"label_smoothing must be < 0.5 \(got {e}\)"):
      dpo.robust_dpo_loss(*args, label_smoothing=e)
  for fn in (dpo.robust_dpo_loss, dpo.dpo_loss, dpo.aot_loss,
             dpo.aot_unpaired_loss):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\] \(got -0.1\)"):
      fn(*args, label_smoothing=-0.1)
  for fn in (dpo.dpo_loss, dpo.aot_loss, dpo.aot_unpaired_loss):
    fn(*args, label_smoothing=0.5)  # cDPO allows e = 1/2
    with pytest.raises(ValueError, match=r"label_smoothing must be <= 0.5 \(got 0.6\)"):
      fn(*args, label_smoothing=0.6)
  for e in (0.0, 1.0):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \(0, 1\)"):
      dpo.exo_pair_loss(*args, label_smoothing=e)
  with pytest.raises(TypeError, match="label_smoothing must be a Python number"):
    dpo.dpo_loss(*args, label_smoothing=None)


def test_other_options_range(rng):
  args = four_logps(rng)
  with pytest.raises(ValueError, match="tau must be > 0"):
    dpo.discopop_loss(*args, tau=0.0)
  with pytest.raises(TypeError, match="policy_chosen_logps must be a floating-point array"):
    dpo.sft_loss(np.arange(3))
