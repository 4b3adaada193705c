"""SimPO: SmolLM2-135M-Instruct aligned with preference pairs, without a reference model.

Simple preference optimisation (Meng et al., NeurIPS 2024): the length-averaged log-prob margin
with ``beta=2.0`` and target margin ``gamma = 0.25 beta``. No term reads a reference or a
teacher, so the teacher is read only to initialise the policy as its copy (``every=1``) and then
dropped (``teacher.online=False``)::

  python -m jkd.train --config configs/simpo.py --workdir /tmp/jkd_simpo \\
      --config.data.path=pairs.jsonl

Data: ``data.source=preference`` reads ``data.path``, JSONL files of ``{"prompt", "chosen",
"rejected"}`` text (built once into a TFDS dataset under ``data.cache_dir``) or a TFDS
preference dataset directory (e.g. from ``python -m jkd.data.preference make``); prompts go
through the chat template, labels cover the completions only. There is no evaluation set
(``eval.every=0``); the ``simpo/rewards/*`` metrics are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), the policy a copy of it,
random token pairs (``data.source=synthetic_pairs``), 3 steps in seconds.
"""

from jkd.train import recipes
from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.teacher.online = False
  c.student.source = "layers"
  c.student.every = 1
  c.objective = {"simpo": {"term": "simpo", "weight": 1.0, "beta": 2.0, "gamma_beta_ratio": 0.25}}
  c.optimizer.update(dict(lr=1e-6, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path="", shape="", seq_len=512, batch_size=8))
  c.train.update(dict(steps=500, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=100, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, seq_len=32)
    c.student.every = 1
    c.data.update(dict(source="synthetic_pairs", shape=""))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of simpo; use no arg or 'cpu'.")
  return c

