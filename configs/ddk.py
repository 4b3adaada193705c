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

from jkd.train import config
from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("ddk", arg)
  c = recipes.smollm2_config({"kd": {"term": "forward_kl", "weight": 1.0},
                              "ce": {"term": "cross_entropy", "weight": 0.1}},
                              source="domains")
  c.data.update(dict(source="domains", seq_len=256))
  config.add_sections(c, "ddk")
  c.ddk.update(dict(alpha=0.5, floor=0.1, eval_fraction=0.05))
  c.train.update(dict(steps=500, log_every=10))
  c.eval.update(dict(every=50, batches=0, at_start=False))
  if variant == "cpu":
    recipes.tiny_teacher(c, lr=3e-3)
    c.data.update(dict(num_examples=16, eval_examples=8, seq_len=16, batch_size=4))
    c.ddk.update(dict(num_domains=3))
    c.eval.update(dict(every=2))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (synthetic domains): no config overrides."""
  del workdir, arg
  return {}
