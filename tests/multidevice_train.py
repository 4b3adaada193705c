"""Run by tests/test_train_sharding.py in a subprocess with 8 simulated CPU devices.

Trains a tiny student for 3 steps on each mesh and prints the per-step metrics as JSON.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jkd import losses, models, train


def run(mesh_shape, devices):
  mesh = train.make_mesh(mesh_shape, devices)
  tcfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                            num_heads=4, num_kv_heads=2)
  tparams = models.init_params(tcfg, jax.random.key(0))
  scfg, sparams = models.student_from_teacher(tparams, tcfg, every=2)
  obj = losses.build_objective({"generalized_jsd": {"beta": 0.5}, "cross_entropy": 0.1})
  opt, sched = train.make_optimizer({"lr": 1e-2, "warmup_steps": 1}, 10)
  axes_s, axes_t = models.param_axes(scfg), models.param_axes(tcfg)
  ps = train.shardings_for(jax.eval_shape(lambda: sparams), axes_s, mesh)
  pt = train.shardings_for(jax.eval_shape(lambda: tparams), axes_t, mesh)
  abstract = jax.eval_shape(lambda p: train.init_state(p, opt, obj), sparams)
  ss = train.state_shardings(abstract, ps, opt, mesh)
  state = jax.jit(lambda p: train.init_state(p, opt, obj), out_shardings=ss)(
      jax.device_put(sparams, ps))
  tparams = jax.device_put(tparams, pt)
  bs = train.batch_sharding(mesh)
  step = jax.jit(train.make_train_step(student_config=scfg, teacher_config=tcfg, objective=obj,
                                       optimizer=opt, schedule=sched),
                 in_shardings=(ss, bs, None, pt), out_shardings=(ss, None), donate_argnums=0)
  toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 64))
  labels = np.roll(toks, -1, 1)
  labels[:, -1] = -100
  batch = jax.device_put({"tokens": toks, "labels": labels}, bs)
  out = []
  for _ in range(3):
    state, m = step(state, batch, jax.random.key(2), tparams)
    out.append({k: float(v) for k, v in m.items()})
  return out


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  results = {"single": run((1, 1, 1), jax.devices()[:1])}
  for shape in ((8, 1, 1), (2, 2, 2), (1, 8, 1), (1, 1, 8)):
    results[str(shape)] = run(shape, jax.devices())
  json.dump(results, sys.stdout)
