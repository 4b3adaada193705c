"""Run by tests/test_train_multiprocess.py: one of N processes (jax.distributed on localhost).

argv: process_id num_processes port. Each process holds its share of the global batch; process 0
prints the per-step metrics as JSON. With num_processes=1 it is the single-process reference.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402

from jkd import losses, models, train  # noqa: E402


def main(pid, n, port):
  if n > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n,
                               process_id=pid, initialization_timeout=120)
  mesh = train.make_mesh((-1, 1, 1))
  tcfg = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                            num_heads=4, num_kv_heads=2)
  tparams = models.init_params(tcfg, jax.random.key(0))
  scfg, sparams = models.student_from_teacher(tparams, tcfg, every=2)
  obj = losses.build_objective({"forward_kl": 1.0, "cross_entropy": 0.1})
  opt, sched = train.make_optimizer({"lr": 1e-2, "warmup_steps": 1}, 10)
  ps = train.shardings_for(jax.eval_shape(lambda: sparams), models.param_axes(scfg), mesh)
  pt = train.shardings_for(jax.eval_shape(lambda: tparams), models.param_axes(tcfg), mesh)
  abstract = jax.eval_shape(lambda p: train.init_state(p, opt, obj), sparams)
  ss = train.state_shardings(abstract, ps, opt, mesh)
  put = lambda tree, shardings: jax.tree.map(  # noqa: E731
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)
  state = jax.jit(lambda p: train.init_state(p, opt, obj), out_shardings=ss)(put(sparams, ps))
  tparams = put(tparams, pt)
  bs = train.batch_sharding(mesh)
  step = jax.jit(train.make_train_step(student_config=scfg, teacher_config=tcfg, objective=obj,
                                       optimizer=opt, schedule=sched),
                 in_shardings=(ss, bs, None, pt), out_shardings=(ss, None), donate_argnums=0)
  toks = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 64))
  labels = np.roll(toks, -1, 1)
  labels[:, -1] = -100
  share = slice(pid * 8 // n, (pid + 1) * 8 // n)  # This process's rows of the global batch.
  batch = {k: jax.make_array_from_process_local_data(bs, v[share], v.shape)
           for k, v in {"tokens": toks, "labels": labels}.items()}
  out = []
  for _ in range(3):
    state, m = step(state, batch, jax.random.key(2), tparams)
    out.append({k: float(v) for k, v in m.items()})
  if pid == 0:
    print(json.dumps(out))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:4]))
