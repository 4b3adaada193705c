"""Data selection: MiniPLM difference sampling and DDK domain weights (jkd.data.selection)."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from jkd import models
from jkd.data import selection as sel
from jkd.data import ArraySource

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
            num_kv_heads=2)


CONFIG = models.ModelConfig(**TINY)
# Eager init of nn.scan is slow: jit it (one compilation for every seed).
_init = jax.jit(models.init_params, static_argnums=0,
                compiler_options={"xla_backend_optimization_level": 0})
_logits = jax.jit(lambda p, x: models.apply(p, x, config=CONFIG).logits,
                  compiler_options={"xla_backend_optimization_level": 0})


@functools.cache
def tiny_model(seed: int):
  return _init(CONFIG, jax.random.key(seed)), CONFIG


def documents(rng, n=7, t=10, vocab=64):
  tokens = rng.integers(0, vocab, size=(n, t)).astype(np.int32)
  labels = np.concatenate([tokens[:, 1:], rng.integers(0, vocab, size=(n, 1))], 1)
  labels = labels.astype(np.int32)
  lengths = rng.integers(3, t + 1, size=n)
  mask = np.arange(t)[None] < lengths[:, None]
  mask[:, 0] = False  # e.g. a prompt token
  labels[:, -1] = np.where(rng.random(n) < 0.5, -100, labels[:, -1])
  return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def ref_means(params, config, ex):
  """Float64 log-softmax of the model's logits, averaged over the counted labels."""
  assert config == CONFIG
  logits = np.asarray(_logits(params, ex["tokens"]), np.float64)
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  out = []
  for i in range(len(logits)):
    counted = [(t, y) for t, y in enumerate(ex["labels"][i])
               if ex["loss_mask"][i, t] and y != -100]
    out.append(np.mean([logp[i, t, y] for t, y in counted]))
  return np.array(out)


# --- MiniPLM. -------------------------------------------------------------------------------

def test_document_logprob_means_against_numpy(rng):
  params, config = tiny_model(0)
  ex = documents(rng)
  expected = ref_means(params, config, ex)
  got = sel.document_logprob_means(params, config, ex, batch_size=3)  # 7 = 3 + 3 + 1 padded
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
  assert got.shape == (7,) and (got < 0).all()
  counts = (ex["loss_mask"] & (ex["labels"] != -100)).sum(1)
  np.testing.assert_allclose(sel.mean_token_nll(params, config, ex, batch_size=3),
                             -(expected * counts).sum() / counts.sum(), rtol=2e-5)


def test_document_logprob_means_bad_input(rng):
  params, config = tiny_model(0)
  ex = documents(rng)
  empty = {**ex, "loss_mask": ex["loss_mask"].copy()}
  empty["loss_mask"][[2, 5]] = False
  with pytest.raises(ValueError, match=r"document\(s\) \[2, 5\] have no counted token"):
    sel.document_logprob_means(params, config, empty)
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    sel.document_logprob_means(params, config, {**ex, "tokens": ex["tokens"] + 64})
  with pytest.raises(ValueError, match="'tokens' and 'labels'"):
    sel.document_logprob_means(params, config, {"tokens": ex["tokens"]})
  with pytest.raises(ValueError, match="one shape"):
    sel.document_logprob_means(params, config, {**ex, "labels": ex["labels"][:, :4]})
  with pytest.raises(ValueError, match="batch_size"):
    sel.document_logprob_means(params, config, ex, batch_size=0)


def test_difference_scores_and_top_fraction():
  np.testing.assert_array_equal(sel.difference_scores([-1.0, -2.0], [-1.5, -1.0]), [0.5, -1.0])
  scores = np.array([0.3, 0.9, 0.3, -0.2, 0.9, 0.3])
  assert sel.select_top_fraction(scores, 0.5).tolist() == [0, 1, 4]  # tie at 0.3: earliest
  assert sel.select_top_fraction(scores, 0.34).tolist() == [0, 1, 4]  # ceil(2.04) = 3
  assert sel.select_top_fraction(scores, 1 / 3).tolist() == [1, 4]
  assert sel.select_top_fraction(scores, 0.01).tolist() == [1]
  assert sel.select_top_fraction(scores, 1.0).tolist() == list(range(6))
  for bad in (0.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="fraction"):
      sel.select_top_fraction(scores, bad)
  with pytest.raises(ValueError, match="NaN"):
    sel.select_top_fraction([0.1, np.nan], 0.5)
  with pytest.raises(ValueError, match="non-finite"):
    sel.difference_scores([0.0, np.inf], [0.0, 0.0])
  with pytest.raises(ValueError, match="one length"):
    sel.difference_scores([0.0], [0.0, 1.0])


def test_miniplm_select_against_numpy(rng):
  teacher, reference = tiny_model(1), tiny_model(2)
  ex = documents(rng, n=9)
  ex["doc_id"] = np.arange(9)
  out = sel.miniplm_select(ex, teacher=teacher, reference=reference, fraction=0.5,
                           batch_size=3)
  scores = ref_means(*teacher, ex) - ref_means(*reference, ex)
  np.testing.assert_allclose(out.scores, scores, rtol=1e-4, atol=1e-5)
  expected = np.sort(np.argsort(-scores)[:5])  # ceil(0.5 * 9) = 5
  assert out.indices.tolist() == expected.tolist()
  assert out.examples["doc_id"].tolist() == expected.tolist()
  np.testing.assert_array_equal(out.examples["tokens"], ex["tokens"][expected])


# --- DDK weights. ---------------------------------------------------------------------------

def ref_ddk(student, teacher, alpha, floor):
  """Weights after each update, from the formula, in float64."""
  s, out = None, []
  for ls, lt in zip(student, teacher):
    gap = np.maximum(np.asarray(ls, float) - np.asarray(lt, float), 0.0)
    s = gap if s is None else alpha * s + (1 - alpha) * gap
    share = s / s.sum() if s.sum() > 0 else np.full(len(s), 1 / len(s))
    out.append((1 - floor) * share + floor / len(s))
  return out


def test_domain_weights_math():
  domains = ["web", "code", "math"]
  student = [[3.0, 2.5, 4.0], [2.8, 2.6, 3.0], [2.0, 1.0, 2.0], [2.5, 3.0, 2.2]]
  teacher = [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0], [2.1, 1.5, 2.5], [2.0, 2.0, 2.0]]
  w = sel.DomainWeights(domains, alpha=0.7, floor=0.2)
  np.testing.assert_allclose(list(w.as_dict().values()), [1 / 3] * 3)
  for got_ls, got_lt, expected in zip(student, teacher, ref_ddk(student, teacher, 0.7, 0.2)):
    got = w.update(dict(zip(domains, got_ls)), dict(zip(reversed(domains), reversed(got_lt))))
    assert list(got) == domains
    np.testing.assert_allclose(list(got.values()), expected, rtol=1e-12)
    assert min(got.values()) >= 0.2 / 3 - 1e-12 and abs(sum(got.values()) - 1) < 1e-12
  # The student better than the teacher everywhere, no smoothing: uniform weights.
  w0 = sel.DomainWeights(domains, alpha=0.0)
  np.testing.assert_allclose(list(w0.update(dict(zip(domains, [1, 1, 1])),
                                            dict(zip(domains, [2, 2, 2]))).values()), [1 / 3] * 3)
  init = sel.DomainWeights(domains, initial={"web": 2.0, "code": 1.0, "math": 1.0})
  np.testing.assert_allclose(list(init.as_dict().values()), [0.5, 0.25, 0.25])


def test_domain_weights_state_round_trip():
  domains = ["a", "b"]
  w = sel.DomainWeights(domains, alpha=0.3, floor=0.05)
  w.update({"a": 3.0, "b": 2.5}, {"a": 2.0, "b": 2.0})
  state = json.loads(json.dumps(w.get_state()))
  w2 = sel.DomainWeights(domains)
  w2.set_state(state)
  assert w2.get_state() == w.get_state()
  nxt = ({"a": 2.2, "b": 2.9}, {"a": 2.0, "b": 2.0})
  assert w2.update(*nxt) == w.update(*nxt)
  with pytest.raises(ValueError, match="domains"):
    sel.DomainWeights(["a", "c"]).set_state(state)


def test_domain_weights_bad_input():
  w = sel.DomainWeights(["a", "b"])
  ok = {"a": 1.0, "b": 1.0}
  with pytest.raises(ValueError, match=r"unknown domain\(s\) \['c'\]"):
    w.update({"a": 1.0, "b": 1.0, "c": 1.0}, ok)
  with pytest.raises(ValueError, match=r"missing domain\(s\) \['b'\]"):
    w.update(ok, {"a": 1.0})
  with pytest.raises(ValueError, match=">= 0"):
    w.update({"a": -1.0, "b": 1.0}, ok)
  with pytest.raises(ValueError, match="non-finite"):
    w.update(ok, {"a": float("nan"), "b": 1.0})
  assert w.updates == 0 and w.smoothed is None  # failed updates change nothing
  for kwargs in ({"alpha": 1.0}, {"alpha": -0.1}, {"floor": 0.0}, {"floor": 1.5}):
    with pytest.raises(ValueError):
      sel.DomainWeights(["a", "b"], **kwargs)
  with pytest.raises(ValueError, match="distinct"):
    sel.DomainWeights(["a", "a"])


# --- DDK mixture. ---------------------------------------------------------------------------

DOMAINS = ["web", "code", "math"]


def domain_sources(batch_sizes=(3, 2, 5), process_index=0, process_count=1):
  """Per-domain ArraySources whose rows encode (domain, row): tokens = [domain, row]."""
  out = {}
  for d, (name, bs) in enumerate(zip(DOMAINS, batch_sizes)):
    n = 10 + 3 * d
    tokens = np.stack([np.full(n, d), np.arange(n)], 1).astype(np.int32)
    out[name] = ArraySource({"tokens": tokens, "labels": tokens}, bs, seed=d,
                            process_index=process_index, process_count=process_count)
  return out


def mixture(seed=0, weights=None, **kwargs):
  w = sel.DomainWeights(DOMAINS, initial=weights or {"web": 0.5, "code": 0.3, "math": 0.2})
  return sel.DomainMixture(domain_sources(**kwargs), w, 8, seed,
                           process_index=kwargs.get("process_index", 0),
                           process_count=kwargs.get("process_count", 1))


def test_mixture_determinism_and_proportions():
  a, b = mixture(seed=3), mixture(seed=3)
  batches = [next(a) for _ in range(60)]
  for x in batches:
    y = next(b)
    assert x.keys() == {"tokens", "labels"} and x["tokens"].shape == (8, 2)
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  other = mixture(seed=4)
  assert not all(np.array_equal(x["tokens"], next(other)["tokens"]) for x in batches[:5])
  domains = np.concatenate([x["tokens"][:, 0] for x in batches])
  counts = np.bincount(domains, minlength=3)
  expected = np.array([0.5, 0.3, 0.2]) * len(domains)
  assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all(), counts
  # Within a domain, the rows come in the sub-source's own order (nothing lost or repeated).
  src = domain_sources()["code"]
  code_rows = [r for x in batches for r in x["tokens"][x["tokens"][:, 0] == 1, 1]]
  own = np.concatenate([next(src)["tokens"][:, 1] for _ in range(len(code_rows) // 2 + 1)])
  assert code_rows == own[:len(code_rows)].tolist()


def test_mixture_follows_weight_updates():
  m = mixture(weights={"web": 1.0, "code": 0.0, "math": 0.0})
  assert (next(m)["tokens"][:, 0] == 0).all()
  m.weights.update({"web": 2.0, "code": 2.0, "math": 5.0}, {"web": 2.0, "code": 2.0,
                                                              "math": 2.0})
  later = np.concatenate([next(m)["tokens"][:, 0] for _ in range(10)])
  assert (later == 2).mean() > 0.8  # math: 0.9 + 0.1/3 of the weight


def test_mixture_state_round_trip_mid_buffer():
  m = mixture(seed=1)
  for _ in range(5):
    next(m)
  m.weights.update({"web": 2.5, "code": 3.0, "math": 2.0}, {"web": 2.0, "code": 2.0,
                                                              "math": 2.0})
  next(m)
  state = json.loads(json.dumps(m.get_state()))
  assert any(s["offset"] is not None for s in state["sources"].values())  # a partial buffer
  expected = [next(m) for _ in range(12)]
  fresh = mixture(seed=1)
  fresh.set_state(state)
  assert fresh.weights.get_state() == m.weights.get_state()
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["tokens"], e["tokens"])
  with pytest.raises(ValueError, match="seed"):
    mixture(seed=2).set_state(state)


def test_mixture_processes_split_the_global_batch():
  sizes = (4, 2, 6)  # each sub-source's batch splits over 2 processes too
  whole = mixture(seed=5, batch_sizes=sizes)
  parts = [mixture(seed=5, batch_sizes=sizes, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(4):
    g = next(whole)["tokens"][:, 0]
    local = np.concatenate([next(p)["tokens"][:, 0] for p in parts])
    np.testing.assert_array_equal(local, g)  # same domain draw, each process its half


def test_mixture_one_epoch_and_bad_input():
  m = mixture()
  batches = list(m.one_epoch())
  assert [int(b["tokens"][0, 0]) for b in batches] == [0] * 3 + [1] * 6 + [2] * 3
  assert m.step == 0
  with pytest.raises(ValueError, match="one source per weighted domain"):
    sel.DomainMixture(domain_sources(), sel.DomainWeights(["web", "code"]), 8)
  with pytest.raises(TypeError, match="DomainWeights"):
    sel.DomainMixture(domain_sources(), {"web": 1.0}, 8)
  with pytest.raises(ValueError, match="batch_size"):
    sel.DomainMixture(domain_sources(), sel.DomainWeights(DOMAINS), 0)
