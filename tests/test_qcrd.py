"""QCRD: the loss against a float64 NumPy reference and its gradient, the ``qcrd`` term in the
train step, the source's positives (self-consistency) and negatives, and the bad inputs.

References: tests/reference_qcrd.py (written from docs/methods.md §17) and the float64 NumPy
log-softmax of each tiny model (tests/tiny_models.py).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import losses
from jkd.data import critics
from jkd.data import synthetic_pair_examples
from jkd.data.model_spec import char_tokenizer
from jkd.train import preference_step
from jkd.train.sources import qcrd as qcrd_source
import reference_qcrd as ref
from tiny_models import TinyModel

TINY = TinyModel(max_position_embeddings=256)
CONFIG = TINY.config


@pytest.fixture(scope="module")
def nets():
  return {name: TINY.init(jax.random.key(i)) for i, name in enumerate(("student", "teacher"))}


def logps(rng, shape, low=-6.0, high=-0.05):
  return rng.uniform(low, high, size=shape)


# ---------------------------------------------------------------------------------------------
# The loss.

@pytest.mark.parametrize("k", [None, 3])
def test_qcrd_loss_matches_the_numpy_reference(k, rng):
  b = 5
  shape = (b,) if k is None else (b, k)
  pos, neg = logps(rng, b), logps(rng, shape)
  neg.flat[0] = -1e-9  # Probability ~1: clipped, finite.
  neg.flat[1] = -40.0  # Probability ~0: unlikelihood ~0.
  wp, wn = rng.uniform(0, 1, b), rng.uniform(0, 1, shape)
  mask = rng.uniform(size=shape) > 0.3
  mask.reshape(b, -1)[2] = False  # A row without a valid negative: the positive part alone.
  f = jax.jit(lambda *a: losses.qcrd_loss(a[0], a[1], positive_weights=a[2],
                                          negative_weights=a[3], negative_mask=a[4],
                                          negative_weight=0.7))
  got = f(*(jnp.asarray(x, jnp.float32) for x in (pos, neg, wp, wn)), jnp.asarray(mask))
  want = ref.qcrd_loss(pos, neg, wp=wp, wn=wn, mask=mask, lam=0.7)
  assert got.shape == (b,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got[2], -wp[2] * pos[2], rtol=1e-6)
  # Defaults: weights 1, every negative counts.
  np.testing.assert_allclose(losses.qcrd_loss(jnp.asarray(pos), jnp.asarray(neg)),
                             ref.qcrd_loss(pos, neg), rtol=2e-5)
  assert np.all(ref.qcrd_loss(-np.abs(pos), neg) >= 0)  # Bounded below by 0.


def test_qcrd_masked_negatives_equal_dropped_ones(rng):
  pos, neg = logps(rng, 4), logps(rng, (4, 3))
  mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0]], bool)
  bad = neg.copy()
  bad[:, 2] = np.nan  # Masked values never reach the math: no NaN in value or gradient.
  masked = lambda n: losses.qcrd_loss(jnp.asarray(pos, jnp.float32), n,  # noqa: E731
                                      negative_mask=jnp.asarray(mask)).sum()
  dropped = losses.qcrd_loss(jnp.asarray(pos, jnp.float32), jnp.asarray(neg[:, :2], jnp.float32))
  value, grad = jax.jit(jax.value_and_grad(masked))(jnp.asarray(bad, jnp.float32))
  np.testing.assert_allclose(value, dropped.sum(), rtol=1e-6)
  assert np.isfinite(grad).all() and np.all(grad[:, 2] == 0)


def test_qcrd_gradient_matches_finite_differences_of_the_reference(rng, x64):
  pos, neg = logps(rng, 4, high=-0.2), logps(rng, (4, 2), high=-0.2)
  wp, wn = rng.uniform(0, 1, 4), rng.uniform(0, 1, (4, 2))

  def total(p, n):
    return losses.qcrd_loss(p, n, positive_weights=jnp.asarray(wp), negative_weights=jnp.asarray(
        wn), negative_weight=1.3).sum()

  gp, gn = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(pos), jnp.asarray(neg))
  assert gp.dtype == jnp.float64
  want_p = ref.numerical_grad(lambda x: ref.qcrd_loss(x, neg, wp=wp, wn=wn, lam=1.3).sum(), pos)
  want_n = ref.numerical_grad(lambda x: ref.qcrd_loss(pos, x, wp=wp, wn=wn, lam=1.3).sum(), neg)
  np.testing.assert_allclose(gp, want_p, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(gn, want_n, rtol=1e-6, atol=1e-9)
  # Analytic: d/dpos = -wp; d/dneg = lam wn e^x / (1 - e^x) / K.
  np.testing.assert_allclose(gp, -wp, rtol=1e-12)
  np.testing.assert_allclose(gn, 1.3 * wn * np.exp(neg) / (1 - np.exp(neg)) / 2, rtol=1e-10)


def test_qcrd_loss_bad_inputs():
  x = jnp.array([-1.0, -2.0])
  with pytest.raises(ValueError, match=r"must be \[B\] or \[B, K\] with B = 2"):
    losses.qcrd_loss(x, jnp.array([-1.0, -2.0, -3.0]))
  with pytest.raises(ValueError, match=r"quality scores in \[0, 1\]"):
    losses.qcrd_loss(x, x, positive_weights=jnp.array([0.5, 1.5]))
  with pytest.raises(ValueError, match="negative_weights has shape"):
    losses.qcrd_loss(x, x, negative_weights=jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="negative_weight must be a finite number >= 0"):
    losses.qcrd_loss(x, x, negative_weight=-1.0)
  with pytest.raises(TypeError, match="floating-point"):
    losses.qcrd_loss(x, jnp.array([1, 2]))


# ---------------------------------------------------------------------------------------------
# The objective term.

def seq_logps(rng, b=4):
  n = rng.integers(3, 9, b)
  mean = logps(rng, b)
  return losses.SequenceLogprobs(sum=jnp.asarray(mean * n, jnp.float32),
                                 mean=jnp.asarray(mean, jnp.float32), count=jnp.asarray(n))


def test_qcrd_term_weights_by_the_teachers_likelihood(rng):
  names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
  inputs = {k: seq_logps(rng) for k in names}
  pc, pr, rc, rr = (np.asarray(inputs[k].mean, np.float64) for k in names)
  total, m = jax.jit(losses.build_objective({"qcrd": {"negative_weight": 0.5}}))(inputs)
  wp, wn = np.exp(rc), 1 - np.exp(rr)
  np.testing.assert_allclose(m["loss/qcrd"], ref.qcrd_loss(pc, pr, wp=wp, wn=wn, lam=0.5).mean(),
                             rtol=2e-5)
  np.testing.assert_allclose(m["qcrd/positive_weight"], wp.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["qcrd/negative_weight"], wn.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["qcrd/positive_nll"], -pc.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["qcrd/margin"], (pc - pr).mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["qcrd/negative_unlikelihood"],
                             (-np.log1p(-np.exp(pr))).mean(), rtol=1e-5)
  # weighting="none": every weight 1, and the teacher's log-probs are not read.
  free = {k: inputs[k] for k in names[:2]}
  _, m = losses.build_objective({"qcrd": {"weighting": "none"}})(free)
  np.testing.assert_allclose(m["loss/qcrd"], ref.qcrd_loss(pc, pr).mean(), rtol=2e-5)


def test_qcrd_term_bad_options_and_missing_inputs(rng):
  with pytest.raises(ValueError, match=r"weighting must be one of .*did you mean \['teacher'\]"):
    losses.build_objective({"qcrd": {"weighting": "teachr"}})
  with pytest.raises(ValueError, match="negative_weight must be a finite number >= 0"):
    losses.build_objective({"qcrd": {"negative_weight": -0.1}})
  with pytest.raises(ValueError, match=r"unknown option|unexpected|beta"):
    losses.build_objective({"qcrd": {"beta": 0.1}})
  inputs = {k: seq_logps(rng) for k in ("policy_chosen", "policy_rejected")}
  with pytest.raises(ValueError, match=r"needs \['ref_chosen', 'ref_rejected'\]"):
    losses.build_objective({"qcrd": 1.0})(inputs)


def _np_mean_logps(params, tokens, labels):
  m = labels != -100
  tok = TINY.np_token_logprobs(params, tokens, np.where(m, labels, 0))
  return np.where(m, tok, 0).sum(1) / m.sum(1)


def test_qcrd_term_in_the_train_step_reads_the_teacher(nets):
  """The step feeds the student's log-probs of both sides and the teacher's (the weights)."""
  batch = synthetic_pair_examples(3, 12, CONFIG.vocab_size, seed=4)
  objective = losses.build_objective({"qcrd": 1.0})

  @jax.jit
  def loss(student, teacher, batch):
    inputs, _ = preference_step.preference_inputs(student, teacher, batch, student_config=CONFIG,
                                                  teacher_config=CONFIG, objective=objective)
    return objective(inputs)[1]["loss/qcrd"]

  got = loss(nets["student"], nets["teacher"], {k: jnp.asarray(v) for k, v in batch.items()})
  side = lambda net, s: _np_mean_logps(nets[net], batch[f"{s}_tokens"],  # noqa: E731
                                       batch[f"{s}_labels"])
  want = ref.qcrd_loss(side("student", "chosen"), side("student", "rejected"),
                       wp=np.exp(side("teacher", "chosen")),
                       wn=1 - np.exp(side("teacher", "rejected"))).mean()
  np.testing.assert_allclose(float(got), want, rtol=2e-5)


# ---------------------------------------------------------------------------------------------
# Positives, negatives and the source.

def test_self_consistency_keeps_the_majority_answer():
  texts = ["x=2 so the answer is 4", "answer is 5", "", "the answer is 4.", "no answer here",
           "answer is 5"]
  # Tie 4 vs 5 (two each): the answer seen first wins; empty and unmatched texts never count.
  assert critics.self_consistent(texts, r"answer is (\d+)") == [True, False, False, True, False,
                                                                 False]
  assert critics.self_consistent(["a 1", "b 2 then 3", "c 3"], r"\d") == [False, True, True]
  assert critics.self_consistent(["a", "", " "], "") == [True, False, False]
  assert critics.self_consistent(["none", "here"], r"(\d)") == [False, False]
  with pytest.raises(ValueError, match="does not compile"):
    critics.self_consistent(["a"], "(")


def test_pair_up_cycles_both_sides_and_drops_copies_of_positives():
  assert qcrd_source.pair_up(["p"], ["n1", "n2", "p"]) == [("p", "n1"), ("p", "n2")]
  assert qcrd_source.pair_up(["p1", "p2", "p3"], ["n"]) == [("p1", "n"), ("p2", "n"), ("p3", "n")]
  assert qcrd_source.pair_up(["p"], ["p"]) == [] and qcrd_source.pair_up([], ["n"]) == []


PROMPTS = ["Hi there", "Name a color.", "Count to three."]


def make_source(**options):
  kw = dict(tokenizer=char_tokenizer(128), seq_len=96, batch_size=4, steps_per_round=2,
            positives=2, negatives=2, max_new_tokens=4, seed=3, process_index=0,
            process_count=1)
  kw.update(options)
  return qcrd_source.QCRDSource(PROMPTS, **kw)


def test_qcrd_source_pairs_teacher_positives_with_fresh_student_negatives(nets):
  src = make_source()
  src.bind_models(teacher_params=nets["teacher"], teacher_config=CONFIG, student_config=CONFIG)
  src.before_batch(nets["student"])
  first = next(src)
  assert first["chosen_tokens"].shape == (4, 96)
  sample = lambda net, n, t, r, stream: critics.sample(  # noqa: E731
      PROMPTS, model=(nets[net], CONFIG), tokenizer=src.tokenizer, n=n, max_new_tokens=4,
      temperature=t, seed=3, round_index=r, stream=stream)
  teacher = [c.completion for c in sample("teacher", 2, 0.7, 0, 1)]
  student = [c.completion for c in sample("student", 2, 1.5, 0, 0)]
  want = []
  for i, p in enumerate(PROMPTS):
    pos = list(dict.fromkeys(t for t in teacher[2 * i:2 * i + 2] if t.strip()))
    neg = [t for t in student[2 * i:2 * i + 2] if t.strip()]
    want += [{"prompt": p, "chosen": a, "rejected": b} for a, b in qcrd_source.pair_up(pos, neg)]
  assert src._made["records"] == want and want
  assert first["metric/qcrd_data/rows"][0] == len(want)
  assert first["metric/qcrd_data/round"][0] == 0
  assert 0 < first["metric/qcrd_data/positive_rate"][0] <= 1
  # Mid-round resume serves the same batch; round 1 draws fresh negatives from the student.
  mid = json.loads(json.dumps(src.get_state()))
  second = next(src)
  restored = make_source()
  restored.set_state(mid)
  again = next(restored)
  for k in second:
    np.testing.assert_array_equal(again[k], second[k])
  third = next(src)
  assert third["metric/qcrd_data/round"][0] == 1
  negatives = {r["rejected"] for r in src._made["records"]}
  assert negatives <= {c.completion for c in sample("student", 2, 1.5, 1, 0)}


def test_qcrd_source_bad_settings():
  with pytest.raises(ValueError, match=r"qcrd.positives must be an int >= 1"):
    make_source(positives=0)
  with pytest.raises(ValueError, match="negative_temperature must be > 0"):
    make_source(negative_temperature=0.0)
  with pytest.raises(ValueError, match="does not compile"):
    make_source(answer_pattern="(")
  with pytest.raises(ValueError, match="needs the teacher: call bind_models"):
    next(make_source())
