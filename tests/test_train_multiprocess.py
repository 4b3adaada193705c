"""Two processes on localhost (jax.distributed) give the metrics of one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(n, port):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(HERE / "multiprocess_train.py"), str(i), str(n),
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=HERE.parent) for i in range(n)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return json.loads(outs[0][0].strip().splitlines()[-1])  # Gloo logs to stdout too.


def test_two_processes_equal_one():
  single = _run(1, _free_port())
  double = _run(2, _free_port())
  assert len(single) == len(double) == 3
  for ref, got in zip(single, double):
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert single[-1]["loss/total"] != single[0]["loss/total"]
