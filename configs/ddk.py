"""DDK: distil on a domain mixture whose weights follow the student-teacher gap per domain.

The train batches mix one source per domain; after every evaluation the student's and the
teacher's token-mean NLL on each domain's eval set give the gap ``max(l_S - l_T, 0)``, smoothed
(``ddk.alpha``), and the domains are sampled in proportion to it (with a uniform ``ddk.floor``
share); the weights are logged as ``ddk/weight/<domain>`` and checkpointed with the data state
(``data.source="domains"``, :mod:`jkd.train.sources.ddk`). Default: SmolLM2-135M-Instruct teaching
every 5th of its layers on JSONL files whose lines carry a ``domain`` field (``text``,
``prompt_completion`` or ``chat`` lines)::

  python -m jkd.train --config configs/ddk.py --workdir /tmp/ddk --config.ddk.path=mixed.jsonl

Variant ``cpu``: a random tiny teacher, 3 synthetic domains (bigram chains of different
branching), evaluation and a weight update every 2 of 4 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/ddk.py:cpu --workdir /tmp/ddk_cpu
"""

from jkd.train.config import default_config

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"kd": {"term": "forward_kl", "weight": 1.0},
                 "ce": {"term": "cross_entropy", "weight": 0.1}}
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="domains", seq_len=256, batch_size=8))
  c.ddk.update(dict(alpha=0.5, floor=0.1, eval_fraction=0.05))
  c.train.update(dict(steps=500, log_every=10, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=50, batches=0))
  c.checkpoint.update(dict(every=50, keep=2))
  if arg == "cpu":
    c.teacher.source = "random"
    c.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                num_layers=4, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64))
    c.student.every = 2
    c.optimizer.update(dict(lr=3e-3, warmup_steps=1))
    c.data.update(dict(num_examples=16, eval_examples=8, seq_len=16, batch_size=4))
    c.ddk.update(dict(num_domains=3))
    c.train.update(dict(steps=4, log_every=1))
    c.eval.update(dict(every=2))
    c.checkpoint.update(dict(every=2, keep=2))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of ddk; use no arg or 'cpu'.")
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (synthetic domains): no config overrides."""
  del workdir, arg
  return {}
