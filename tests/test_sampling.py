"""jkd.sampling: KV-cached generation against a no-cache reference, filters against NumPy.

The reference decoder re-runs :func:`jkd.models.apply` *without* a cache on each prompt alone
(unpadded), growing the sequence one argmax token at a time. It runs on a fixed-length buffer
whose tail holds not-yet-generated zeros: attention is causal, so the logits at position
``len - 1`` depend on the first ``len`` tokens only, and one compilation serves every length.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import sampling
from jkd.models import ModelConfig, apply, init_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2)
V = CFG.vocab_size
REF_LEN = 48  # reference buffer: longest prompt + new tokens


def make_params(config: ModelConfig = CFG, seed: int = 0):
  """Random parameters whose layers matter and whose logits are spread out (at the normal(0.02)
  init the residual stream is the input embedding and the output nearly uniform): layer kernels
  x4, final norm x10. Greedy continuations then vary and argmax margins are far above float
  error."""
  params = init_params(config, jax.random.key(seed))
  params["layers"] = jax.tree.map(lambda a: a * 4.0 if a.ndim > 2 else a, params["layers"])
  params["final_norm"]["scale"] = params["final_norm"]["scale"] * 10.0
  return params


@functools.cache
def params_fixture():
  return make_params()


@functools.cache
def _nocache_logits(config: ModelConfig):
  return jax.jit(lambda p, x: apply(p, x, config=config).logits)


def reference_logits(params, sequence, config: ModelConfig = CFG) -> np.ndarray:
  """No-cache logits ``[len, V]`` of one unpadded sequence (float64)."""
  buf = np.zeros((1, REF_LEN), np.int32)
  buf[0, :len(sequence)] = sequence
  return np.asarray(_nocache_logits(config)(params, buf), np.float64)[0, :len(sequence)]


def reference_greedy(params, prompt, n, config: ModelConfig = CFG):
  """``(tokens [n], logits [n, V])`` of greedy decoding by re-running the model without a
  cache on the growing sequence."""
  seq = list(prompt)
  logits = []
  for _ in range(n):
    step = reference_logits(params, seq, config)[-1]
    logits.append(step)
    seq.append(int(np.argmax(step)))
  return np.asarray(seq[len(prompt):]), np.stack(logits)


def log_softmax(x):
  x = x - np.max(x, axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


PROMPTS = [  # lengths 3, 9, 1, 15, 5: one batch of 5 (bucket 8), prompts padded to 16
    [5, 9, 2],
    [7, 1, 1, 3, 8, 12, 40, 33, 2],
    [11],
    [3, 3, 60, 21, 17, 4, 2, 9, 9, 10, 50, 1, 6, 7, 8],
    [0, 63, 5, 6, 2],
]
N = 10  # new tokens


@pytest.fixture(scope="module")
def greedy_run():
  params = params_fixture()
  out = sampling.generate(params, PROMPTS, config=CFG, key=None, greedy=True, max_new_tokens=N,
                          bucket=8, return_logits=True)
  refs = [reference_greedy(params, p, N) for p in PROMPTS]
  return out, refs


# ------------------------------------------------------------------------------------------------
# Greedy decoding, KV cache and log-probs against the no-cache reference


def test_greedy_equals_no_cache_reference_loop(greedy_run):
  out, refs = greedy_run
  assert out.tokens.shape == (len(PROMPTS), N) and out.tokens.dtype == jnp.int32
  for i, (tokens, _) in enumerate(refs):
    np.testing.assert_array_equal(np.asarray(out.tokens[i]), tokens, err_msg=f"prompt {i}")
  np.testing.assert_array_equal(out.lengths, [N] * len(PROMPTS))
  np.testing.assert_array_equal(out.prompt_lengths, [len(p) for p in PROMPTS])
  # Not a constant model: the prompts continue differently.
  assert len({tuple(t) for t, _ in refs}) > 1


def test_kv_cache_logits_equal_no_cache_logits_at_each_step(greedy_run):
  out, refs = greedy_run
  assert out.logits.shape == (len(PROMPTS), N, V)
  for i, (_, logits) in enumerate(refs):
    np.testing.assert_allclose(np.asarray(out.logits[i]), logits, atol=2e-4, rtol=1e-5,
                               err_msg=f"prompt {i}")
  # The argmax margins are far above the cache / no-cache difference: the greedy equality of
  # the test above is not luck.
  diff = max(np.max(np.abs(np.asarray(out.logits[i]) - lg)) for i, (_, lg) in enumerate(refs))
  top2 = np.sort(np.concatenate([lg for _, lg in refs]), axis=-1)[:, -2:]
  assert np.min(top2[:, 1] - top2[:, 0]) > 20 * diff


def test_greedy_logprobs_are_log_softmax_of_the_reference(greedy_run):
  out, refs = greedy_run
  for i, (tokens, logits) in enumerate(refs):
    want = log_softmax(logits)[np.arange(N), tokens]
    np.testing.assert_allclose(np.asarray(out.logprobs[i]), want, atol=2e-4)


def test_sampled_logprobs_are_unfiltered_log_softmax():
  """Sampled with temperature and top-k; the log-probs are of the raw temperature-1 model."""
  params = params_fixture()
  out = sampling.generate(params, PROMPTS, config=CFG, key=jax.random.key(3), max_new_tokens=N,
                          temperature=1.7, top_k=6, bucket=8)
  for i, prompt in enumerate(PROMPTS):
    new = np.asarray(out.tokens[i])
    logits = reference_logits(params, list(prompt) + list(new))[len(prompt) - 1:-1]
    np.testing.assert_allclose(np.asarray(out.logprobs[i]),
                               log_softmax(logits)[np.arange(N), new], atol=2e-4)
    rank = np.sum(logits > logits[np.arange(N), new][:, None], axis=-1)
    assert np.all(rank < 6), "a token outside the top-k was sampled"


ARCHITECTURES = {  # every option the decode step handles apart from the default Llama
    "qwen2-qkv-bias-moe": CFG.replace(architecture="qwen2", qkv_bias=True, num_experts=4,
                                      num_experts_per_tok=2),
    "qwen3-qk-norm-head-dim-untied-llama3-rope-mqa": CFG.replace(
        architecture="qwen3", qk_norm=True, head_dim=16, tie_embeddings=False,
        rope_scaling=(8.0, 1.0, 4.0, 16), num_kv_heads=1),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_kv_cache_logits_equal_no_cache_logits_other_architectures(name):
  """The decode step against the model's no-cache apply, on the tokens it sampled."""
  config = ARCHITECTURES[name]
  params = make_params(config, seed=1)
  prompts = [PROMPTS[1], PROMPTS[4]]
  out = sampling.generate(params, prompts, config=config, key=jax.random.key(0),
                          max_new_tokens=6, bucket=8, return_logits=True)
  for i, prompt in enumerate(prompts):
    seq = list(prompt) + np.asarray(out.tokens[i]).tolist()
    want = reference_logits(params, seq, config)[len(prompt) - 1:-1]
    np.testing.assert_allclose(np.asarray(out.logits[i]), want, atol=2e-4, rtol=1e-5)


def test_prompt_forms_agree(greedy_run):
  """A right-padded (tokens, mask) pair and a [B, T] array give what the list form gives."""
  out, _ = greedy_run
  params = params_fixture()
  width = max(len(p) for p in PROMPTS) + 2
  tokens = np.full((len(PROMPTS), width), 7, np.int32)  # pad value is irrelevant
  mask = np.zeros_like(tokens)
  for i, p in enumerate(PROMPTS):
    tokens[i, 1:1 + len(p)] = p  # padding on both sides
    mask[i, 1:1 + len(p)] = 1
  pair = sampling.generate(params, (tokens, mask), config=CFG, key=None, greedy=True,
                           max_new_tokens=N, bucket=8, return_logits=True)
  np.testing.assert_array_equal(pair.tokens, out.tokens)
  np.testing.assert_array_equal(pair.prompt_lengths, out.prompt_lengths)
  square = np.asarray([PROMPTS[1], PROMPTS[1][::-1]] * 3, np.int32)  # same buckets as above
  arr = sampling.generate(params, square, config=CFG, key=None, greedy=True, max_new_tokens=N,
                          bucket=8, return_logits=True)
  np.testing.assert_array_equal(arr.tokens[0], out.tokens[1])
  np.testing.assert_array_equal(arr.tokens[2], out.tokens[1])


# ------------------------------------------------------------------------------------------------
# Filters against a float64 NumPy reference


def np_filter(logits, top_k=0, top_p=1.0, min_p=0.0):
  """Reference filters, from their definitions, applied one after the other."""
  x = np.asarray(logits, np.float64).copy()
  out = []
  for row in x:
    keep = np.isfinite(row)
    if top_k:
      order = np.argsort(-row, kind="stable")
      k_keep = np.zeros_like(keep)
      k_keep[order[:top_k]] = True
      keep &= k_keep | (row == row[order[min(top_k, len(row)) - 1]])
    if top_p < 1.0:
      p = np.where(keep, np.exp(row - row[keep].max()), 0.0)
      p /= p.sum()
      order = np.argsort(-p, kind="stable")
      total, chosen = 0.0, []
      for j in order:  # smallest set of most likely tokens with mass >= top_p
        chosen.append(j)
        total += p[j]
        if total >= top_p:
          break
      p_keep = np.zeros_like(keep)
      p_keep[chosen] = True
      keep &= p_keep
    if min_p > 0.0:
      p = np.where(keep, np.exp(row - row[keep].max()), 0.0)
      p /= p.sum()
      keep &= p >= min_p * p.max()
    out.append(np.where(keep, row, -np.inf))
  return np.stack(out)


FILTER_CASES = [
    dict(top_k=1), dict(top_k=5), dict(top_k=40), dict(top_k=100),
    dict(top_p=0.05), dict(top_p=0.5), dict(top_p=0.9), dict(top_p=1.0),
    dict(min_p=0.05), dict(min_p=0.3), dict(min_p=1.0),
    dict(top_k=10, top_p=0.7), dict(top_k=20, top_p=0.9, min_p=0.1), dict(top_p=0.8, min_p=0.2),
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                      c.items()))
def test_filter_logits_matches_numpy(case, rng):
  logits = rng.normal(size=(6, 40)) * 2.0
  logits[0, :5] = -np.inf  # banned tokens stay banned
  logits[1, 3] = 12.0  # one token holds almost all the mass
  want = np_filter(logits, **case)
  got = jax.jit(functools.partial(sampling.filter_logits, **case))(jnp.asarray(logits,
                                                                                jnp.float32))
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(np.where(np.isfinite(want), got, 0),
                             np.where(np.isfinite(want), want, 0), rtol=1e-6)
  # Traced top-p / min-p (one compilation for all values) agree with the static ones.
  traced = jax.jit(lambda x, p, m: sampling.filter_logits(
      x, top_k=case.get("top_k", 0), top_p=p, min_p=m))(
          jnp.asarray(logits, jnp.float32), case.get("top_p", 1.0), case.get("min_p", 0.0))
  np.testing.assert_array_equal(np.isfinite(traced), np.isfinite(want))


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_top_p_over_a_large_vocabulary_matches_numpy(top_p, rng):
  """Rows whose top NUCLEUS_CANDIDATES logits hold the nucleus (peaked, as LM rows) take the
  fast path; a flat row forces the full sort: both agree with the reference."""
  vocab = 3 * sampling.NUCLEUS_CANDIDATES + 17
  peaked = rng.normal(size=(3, vocab)) * 1.0
  peaked[:, :20] += 9.0  # almost all mass on a few tokens
  flat = rng.normal(size=(3, vocab)) * 0.1  # the nucleus spans most of the vocabulary
  for logits in (peaked, np.concatenate([peaked[:2], flat[:1]]), flat):
    want = np_filter(logits, top_p=top_p)
    got = np.asarray(jax.jit(functools.partial(sampling.filter_logits, top_p=top_p))(
        jnp.asarray(logits, jnp.float32)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


def test_filter_logits_neutral_values_are_identity(rng):
  x = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
  np.testing.assert_array_equal(sampling.filter_logits(x), x)
  np.testing.assert_array_equal(sampling.filter_logits(x, top_k=17), x)


# ------------------------------------------------------------------------------------------------
# Sampling: determinism and frequencies


def test_fixed_key_is_deterministic_and_keys_differ():
  params = params_fixture()
  run = lambda seed: np.asarray(sampling.generate(  # noqa: E731
      params, PROMPTS, config=CFG, key=jax.random.key(seed), max_new_tokens=N, temperature=1.7,
      top_k=6, bucket=8).tokens)
  a, b, c = run(3), run(3), run(4)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.3


@pytest.mark.parametrize("filters", [{}, {"top_k": 4}, {"top_p": 0.6, "min_p": 0.05}],
                         ids=["plain", "top_k", "top_p+min_p"])
def test_sample_frequencies_match_softmax(filters):
  """One step from 8192 copies of a prompt: token frequencies vs the filtered softmax."""
  params = params_fixture()
  n, temperature, prompt = 8192, 0.7, [4, 8, 15, 16, 23, 42]
  out = sampling.generate(params, [prompt] * n, config=CFG, key=jax.random.key(0),
                          max_new_tokens=1, temperature=temperature, bucket=8, **filters)
  logits = reference_logits(params, prompt)[-1] / temperature
  z = np_filter(logits[None], **filters)[0]
  p = np.exp(z - z.max())
  p /= p.sum()
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=V) / n
  assert np.all(freq[p == 0] == 0), "a filtered-out token was sampled"
  assert np.sum(p > 0.01) >= 3  # a spread-out distribution, not one token
  np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-3)


# ------------------------------------------------------------------------------------------------
# Stopping


def test_eos_and_stop_ids_end_sequences_independently(greedy_run):
  out, refs = greedy_run
  free = [t for t, _ in refs]
  eos = int(free[1][2])  # prompt 1 stops at step 2 at the latest
  stop = int(free[3][4])  # prompt 3 at step 4 at the latest
  got = sampling.generate(params_fixture(), PROMPTS, config=CFG, key=None, greedy=True,
                          max_new_tokens=N, bucket=8, eos_id=eos, stop_ids=(stop,), pad_id=-1)
  lengths = []
  for i, tokens in enumerate(free):
    hits = np.flatnonzero(np.isin(tokens, [eos, stop]))
    n = hits[0] + 1 if hits.size else N
    lengths.append(n)
    want = np.concatenate([tokens[:n], np.full(N - n, -1)])
    np.testing.assert_array_equal(np.asarray(got.tokens[i]), want, err_msg=f"prompt {i}")
    np.testing.assert_array_equal(np.asarray(got.logprobs[i, n:]), 0.0)
  np.testing.assert_array_equal(got.lengths, lengths)
  assert lengths[1] <= 3 and lengths[3] <= 5
  assert N in lengths, "one sequence should run to max_new_tokens (the stops are independent)"


def test_all_sequences_stopping_at_their_first_token(greedy_run):
  """Every sequence stops at once (the loop then ends before its first step)."""
  out, _ = greedy_run
  first = np.asarray(out.tokens[:, 0])
  got = sampling.generate(params_fixture(), PROMPTS, config=CFG, key=None, greedy=True,
                          max_new_tokens=N, bucket=8, stop_ids=tuple(int(t) for t in first))
  np.testing.assert_array_equal(got.lengths, 1)
  np.testing.assert_array_equal(got.tokens[:, 0], first)
  np.testing.assert_array_equal(got.tokens[:, 1:], 0)


# ------------------------------------------------------------------------------------------------
# Compilation buckets


def test_prompts_in_one_bucket_compile_once():
  params = params_fixture()
  opts = dict(config=CFG, key=jax.random.key(0), max_new_tokens=3, bucket=16, temperature=0.9)
  before = sampling.compile_count()
  a = sampling.generate(params, [[1, 2, 3, 4, 5], [6] * 9, [7, 8]], **opts)  # 9 -> 16, 3 -> 4
  b = sampling.generate(params, [[9] * 14, [1] * 11, [2], [3] * 16], **opts)  # 16 -> 16, 4 -> 4
  sampling.generate(params, [[9] * 14], temperature=0.5, top_p=0.9, min_p=0.01,
                    **{k: v for k, v in opts.items() if k != "temperature"})
  assert sampling.compile_count() - before == 2  # the first shape, and the top-p/min-p program
  assert a.tokens.shape == (3, 3) and b.tokens.shape == (4, 3)
  sampling.generate(params, [[9] * 17], **opts)  # 17 -> 32: a new bucket
  assert sampling.compile_count() - before == 3


def test_bucket_helpers():
  assert [sampling.batch_bucket(b) for b in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
  assert [sampling.length_bucket(t, 64) for t in (1, 64, 65)] == [64, 64, 128]


# ------------------------------------------------------------------------------------------------
# Sharded parameters (8 simulated CPU devices, in a subprocess)

SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import test_sampling as t
    from jkd import sampling
    from jkd.models import param_axes

    assert jax.device_count() == 8, jax.devices()
    params = t.make_params()
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "mlp": "tensor"}
    specs = jax.tree.map(lambda s: PartitionSpec(*(rules.get(a) for a in s)), param_axes(t.CFG),
                         is_leaf=lambda s: isinstance(s, PartitionSpec))
    sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda s: isinstance(s, PartitionSpec)))
    kernel = sharded["layers"]["mlp"]["gate"]["kernel"]
    assert len(kernel.sharding.device_set) == 8, kernel.sharding
    opts = dict(config=t.CFG, key=None, greedy=True, max_new_tokens=t.N, bucket=8)
    one = sampling.generate(params, t.PROMPTS, **opts)
    many = sampling.generate(sharded, t.PROMPTS, **opts)
    print(json.dumps({"one": np.asarray(one.tokens).tolist(),
                      "many": np.asarray(many.tokens).tolist(),
                      "lp_diff": float(np.max(np.abs(one.logprobs - many.logprobs)))}))
""")


def test_sharded_params_give_the_unsharded_greedy_output():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
  assert result["one"] == result["many"]
  assert result["lp_diff"] < 1e-4


# ------------------------------------------------------------------------------------------------
# Errors

SMALL = CFG.replace(max_position_embeddings=16)
BAD_CALLS = [
    ("empty list", dict(prompts=[]), "prompts is empty"),
    ("empty prompt", dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    ("all-masked row", dict(prompts=(np.ones((2, 3), np.int32), np.array([[1, 1, 0], [0, 0, 0]]))),
     "prompt 1 is empty"),
    ("mask shape", dict(prompts=(np.ones((2, 3), np.int32), np.ones((2, 4)))), "mask shape"),
    ("id >= vocab", dict(prompts=[[1, 64]]), "token id 64 outside the vocabulary"),
    ("negative id", dict(prompts=[[3], [-1, 2]]), "token id -1 outside"),
    ("float ids", dict(prompts=[[1.5, 2.0]]), "integer token ids"),
    ("nested prompt", dict(prompts=[[[1, 2]]]), "flat list"),
    ("string", dict(prompts="hello"), "list of token-id lists"),
    ("cache_len", dict(prompts=[[1] * 10], max_new_tokens=8, cache_len=16), "exceeds cache_len"),
    ("max positions", dict(prompts=[[1] * 10], max_new_tokens=8, config=SMALL),
     "max_position_embeddings"),
    ("top_p 0", dict(top_p=0.0), "top_p must be in"),
    ("top_p > 1", dict(top_p=1.5), "top_p must be in"),
    ("top_k < 0", dict(top_k=-1), "top_k must be"),
    ("top_k float", dict(top_k=2.5), "top_k must be"),
    ("min_p < 0", dict(min_p=-0.1), "min_p must be in"),
    ("min_p > 1", dict(min_p=1.5), "min_p must be in"),
    ("temperature 0", dict(temperature=0.0), "greedy=True"),
    ("temperature < 0", dict(temperature=-1.0), "temperature must be > 0"),
    ("no key", dict(key=None), "needs a key"),
    ("max_new_tokens 0", dict(max_new_tokens=0), "max_new_tokens must be"),
    ("bucket 0", dict(bucket=0), "bucket must be"),
    ("eos outside vocab", dict(eos_id=64), "stop id 64"),
    ("stop id negative", dict(stop_ids=(3, -2)), "stop id -2"),
]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_are_clear_errors(kwargs, match):
  call = dict(prompts=[[1, 2, 3]], config=CFG, key=jax.random.key(0), max_new_tokens=4)
  call.update(kwargs)
  prompts = call.pop("prompts")
  with pytest.raises(ValueError, match=match):
    sampling.generate(params_fixture(), prompts, **call)


def test_greedy_ignores_temperature_and_filters(greedy_run):
  out, _ = greedy_run
  got = sampling.generate(params_fixture(), PROMPTS, config=CFG, key=None, greedy=True,
                          temperature=0.0, top_k=3, top_p=0.5, min_p=0.2, max_new_tokens=N,
                          bucket=8, return_logits=True)
  np.testing.assert_array_equal(got.tokens, out.tokens)


def test_bad_filter_values_in_filter_logits():
  with pytest.raises(ValueError, match="top_p must be in"):
    sampling.filter_logits(jnp.zeros((2, 4)), top_p=-0.5)
  with pytest.raises(ValueError, match="top_k must be"):
    sampling.filter_logits(jnp.zeros((2, 4)), top_k=True)
