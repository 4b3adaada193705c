"""Tiny distillation run on synthetic data: a CPU smoke test of the whole engine (seconds).

A random 4-layer teacher, a student of every 2nd teacher layer, generalized JSD + 0.1 CE::

  python -m jkd.train --config configs/kd_tiny.py --workdir /tmp/kd_tiny

Variants through the arg (``--config configs/kd_tiny.py:random`` gives a smaller random
student instead of teacher layers); any key can be overridden, e.g.
``--config.train.steps=50 --config.optimizer.lr=1e-3``.
"""

from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "random"
  c.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                              num_layers=4, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=64))
  c.student.source = "layers"
  c.student.every = 2
  if arg == "random":
    c.student.source = "random"
    c.student.model.num_layers = 1
    c.student.model.intermediate_size = 32
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of kd_tiny; use no arg or 'random'.")
  c.objective = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
                 "ce": {"term": "cross_entropy", "weight": 0.1}}
  c.optimizer.update(dict(lr=3e-3, warmup_steps=2, weight_decay=0.0))
  c.data.update(dict(num_examples=64, eval_examples=16, seq_len=16, batch_size=8))
  c.train.update(dict(steps=24, log_every=1, max_nan_steps=3, peak_tflops_per_device=1.0))
  c.eval.update(dict(every=8, batches=0))
  c.checkpoint.update(dict(every=4, keep=3))
  return c
