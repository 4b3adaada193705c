"""Run by tests/test_train_multiprocess.py: one of N processes (jax.distributed on localhost).

argv: process_id num_processes port. Each process holds its share of the global batch; process 0
prints the per-step metrics as JSON. With num_processes=1 it is the single-process reference.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from jkd import train  # noqa: E402
from tiny_run import three_steps, tiny_step  # noqa: E402


def main(pid, n, port):
  if n > 1:
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=n,
                               process_id=pid, initialization_timeout=120)
  mesh = train.make_mesh((-1, 1, 1))
  state, tparams, step, bs, toks, labels = tiny_step(
      mesh, {"forward_kl": 1.0, "cross_entropy": 0.1})
  share = slice(pid * 8 // n, (pid + 1) * 8 // n)  # This process's rows of the global batch.
  batch = {k: jax.make_array_from_process_local_data(bs, v[share], v.shape)
           for k, v in {"tokens": toks, "labels": labels}.items()}
  out = three_steps(state, step, batch, tparams)
  if pid == 0:
    print(json.dumps(out))


if __name__ == "__main__":
  main(*map(int, sys.argv[1:4]))
