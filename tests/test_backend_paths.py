"""jkd's XLA:CPU-only code paths are chosen by the backend (jkd.runtime.xla_cpu, at trace time).

On a GPU or TPU the decode step keeps the model's weight layout with no optimization barrier,
jkd.precision contracts the operands' own axes, and the host allocator is left alone. This
machine has no accelerator, so the backend is simulated (``jkd.runtime.backend`` patched while
the code is traced): the programs traced for "gpu" and "tpu" are checked for what they must not
hold, run here, and compared with the CPU forms. On a real GPU or TPU,
``test_the_real_backend_takes_its_branch`` checks the unpatched choice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import precision, runtime, sampling
from jkd.models import ModelConfig, init_params
from jkd.sampling import decode, sampler

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_embeddings=False, qkv_bias=True)
ACCELERATORS = ["gpu", "tpu"]


@pytest.fixture
def simulate(monkeypatch):
  """``simulate(name)``: jkd takes ``name`` for JAX's default backend from now on."""
  def set_backend(name: str):
    monkeypatch.setattr(runtime, "backend", lambda: name)
  return set_backend


def primitives(closed) -> list[tuple[str, list]]:
  """``(primitive name, input shapes)`` of every equation of a jaxpr and of its sub-jaxprs."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      found.append((eqn.primitive.name, [getattr(v.aval, "shape", ()) for v in eqn.invars]))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(closed.jaxpr)
  return found


def params_for(config: ModelConfig, dtype=jnp.float32):
  params = init_params(config, jax.random.key(0))
  params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 2 else a, params)  # layers that matter
  return jax.tree.map(lambda a: a.astype(dtype), params)


def decode_inputs(config: ModelConfig, batch: int = 3, slots: int = 8):
  cache = {"k": tuple(jnp.asarray(np.random.default_rng(i).normal(
               size=(batch, config.num_kv_heads, config.dim_per_head, slots)), jnp.float32)
               for i in range(config.num_layers)),
           "v": tuple(jnp.asarray(np.random.default_rng(10 + i).normal(
               size=(batch, config.num_kv_heads, slots, config.dim_per_head)), jnp.float32)
               for i in range(config.num_layers)),
           "mask": jnp.arange(slots)[None].repeat(batch, 0) < 5,
           "index": jnp.int32(5), "next_position": jnp.full((batch,), 5, jnp.int32)}
  return jnp.array([1, 7, 30], jnp.int32)[:batch], cache


def one_step(params, tok, cache, config=CFG):
  layers, head = decode.prepare_layers(params, config), decode.prepare_head(params, config)
  return decode.decode_step(params, layers, head, tok, cache, config)


def test_xla_cpu_follows_jax_default_backend(monkeypatch):
  assert runtime.xla_cpu() == (jax.default_backend() == "cpu")
  for name, cpu in (("gpu", False), ("tpu", False), ("cpu", True)):
    monkeypatch.setattr(jax, "default_backend", lambda name=name: name)
    assert runtime.backend() == name and runtime.xla_cpu() == cpu


@pytest.mark.parametrize("backend", ACCELERATORS)
def test_decode_step_off_cpu_has_no_barrier_and_no_transposed_weights(simulate, backend):
  params = params_for(CFG)
  tok, cache = decode_inputs(CFG)
  cpu_prims = primitives(jax.make_jaxpr(lambda p: one_step(p, tok, cache))(params))
  simulate(backend)
  prims = primitives(jax.make_jaxpr(lambda p: one_step(p, tok, cache))(params))
  names = [name for name, _ in prims]
  assert "optimization_barrier" not in names
  assert [s for name, s in prims if name == "transpose" and len(s[0]) == 2] == []
  # The CPU form, traced the same way, has both: the check can tell the two apart.
  cpu_names = [name for name, _ in cpu_prims]
  assert cpu_names.count("optimization_barrier") == 4 * CFG.num_layers + 1  # one per product
  assert any(name == "transpose" and len(s[0]) == 2 for name, s in cpu_prims)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_off_cpu_gives_the_cpu_numbers(simulate, dtype):
  config = CFG.replace(dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
  params = params_for(config, dtype)
  tok, cache = decode_inputs(config)
  want_logits, want_cache = jax.jit(lambda p: one_step(p, tok, cache, config))(params)
  simulate("gpu")  # the TPU takes the same branch (the test above)
  got_logits, got_cache = jax.jit(lambda p: one_step(p, tok, cache, config))(params)
  assert got_logits.dtype == want_logits.dtype == jnp.float32
  tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16 roundings may differ with the sum order
  np.testing.assert_allclose(got_logits, want_logits, rtol=tol, atol=tol)
  for got, want in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_sampler_off_cpu_is_traced_apart_and_gives_the_cpu_tokens(simulate, monkeypatch):
  monkeypatch.setattr(sampler, "_JITTED", {})  # this test's programs only
  params = params_for(CFG)
  prompts = [[3, 4, 5], [9, 1]]
  kwargs = dict(config=CFG, key=None, greedy=True, max_new_tokens=6, return_logits=True)
  want = sampling.generate(params, prompts, **kwargs)
  args = (params, jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 16), bool), jnp.zeros((2,), bool),
          jnp.array([-1], jnp.int32), jax.random.key(0), 1.0, 1.0, 0.0, 0)

  def program_primitives():  # A new jitted program each time: traced with the backend of now.
    program = sampler._build(CFG, 32, 6, False, greedy=True, top_k=0,  # noqa: SLF001
                             use_top_p=False, use_min_p=False)
    return primitives(jax.make_jaxpr(program)(*args))

  cpu_prims = program_primitives()
  assert sampling.compile_count() == 1
  simulate("gpu")
  got = sampling.generate(params, prompts, **kwargs)
  assert sampling.compile_count() == 2  # its own program, not the CPU one from the cache
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  prims = program_primitives()
  assert "optimization_barrier" not in [name for name, _ in prims]
  assert "optimization_barrier" in [name for name, _ in cpu_prims]
  # Weights are 2-D; the only 2-D transposes left are the model's own (none for an untied head).
  assert [s for name, s in prims if name == "transpose" and len(s[0]) == 2] == []


def _bf16(x):
  return np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)


@pytest.mark.parametrize("backend", ACCELERATORS)
def test_precision_off_cpu_contracts_the_original_axes(simulate, rng, backend):
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  w = rng.standard_normal((4, 5, 6)).astype(np.float32)
  g = rng.standard_normal((2, 3, 6)).astype(np.float32)

  def f(a, b):
    return precision.dot(a, b, contract=2, dtype=jnp.bfloat16, out_dtype=jnp.float32)

  def value_and_grads(a, b, ct):
    y, vjp = jax.vjp(f, a, b)
    return (y, *vjp(ct))

  # A fresh function for each trace (jit and make_jaxpr cache traces by function): a cached
  # trace would keep the CPU form.
  cpu_prims = primitives(jax.make_jaxpr(lambda *a: value_and_grads(*a))(x, w, g))
  cpu = jax.jit(lambda *a: value_and_grads(*a))(x, w, g)
  simulate(backend)
  prims = primitives(jax.make_jaxpr(lambda *a: value_and_grads(*a))(x, w, g))
  dots = [shapes for name, shapes in prims if name == "dot_general"]
  assert "reshape" not in [name for name, _ in prims]
  assert sorted(map(tuple, dots)) == sorted([((2, 3, 4, 5), (4, 5, 6)),  # y = x . w
                                             ((2, 3, 6), (4, 5, 6)),  # dx = g . w^T
                                             ((2, 3, 4, 5), (2, 3, 6))])  # dw = x^T . g
  assert "reshape" in [name for name, _ in cpu_prims]
  y, dx, dw = jax.jit(lambda *a: value_and_grads(*a))(x, w, g)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32,) * 3
  # Against float64 NumPy products of the bf16-rounded operands, and the CPU form.
  xm, wm, gm = _bf16(x).reshape(6, 20), _bf16(w).reshape(20, 6), _bf16(g).reshape(6, 6)
  np.testing.assert_allclose(y, (xm @ wm).reshape(y.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, (gm @ wm.T).reshape(x.shape), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, (xm.T @ gm).reshape(w.shape), rtol=1e-5, atol=1e-5)
  for got, want in zip((y, dx, dw), cpu):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_real_backend_takes_its_branch():
  # Unpatched: on this CPU the XLA:CPU forms; on a GPU or TPU (bench/device_check.sh) the plain.
  params = params_for(CFG)
  tok, cache = decode_inputs(CFG)
  names = [n for n, _ in primitives(jax.make_jaxpr(lambda p: one_step(p, tok, cache))(params))]
  on_cpu = jax.default_backend() == "cpu"
  assert runtime.xla_cpu() == on_cpu
  assert ("optimization_barrier" in names) == on_cpu
