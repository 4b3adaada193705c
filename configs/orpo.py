"""ORPO: SmolLM2-135M-Instruct fine-tuned and aligned in one step, without a reference.

Odds-ratio preference optimisation (Hong et al., EMNLP 2024): the chosen completion's NLL plus
``lam=0.1`` x the odds-ratio penalty. No reference: the teacher is read only to initialise the
policy as its copy (``every=1``) and then dropped (``teacher.online=False``)::

  python -m jkd.train --config configs/orpo.py --workdir /tmp/jkd_orpo \\
      --config.data.path=pairs.jsonl

Data: ``data.source=preference`` reads ``data.path``, JSONL files of ``{"prompt", "chosen",
"rejected"}`` text (built once into a TFDS dataset under ``data.cache_dir``) or a TFDS
preference dataset directory (e.g. from ``python -m jkd.data.preference make``); prompts go
through the chat template, labels cover the completions only. There is no evaluation set
(``eval.every=0``); the ``orpo/*`` metrics are logged every step.

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
  c.objective = {"orpo": {"term": "orpo", "weight": 1.0, "lam": 0.1}}
  c.optimizer.update(dict(lr=5e-6, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path="", shape="", seq_len=512, batch_size=8))
  c.train.update(dict(steps=500, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=100, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, seq_len=32)
    c.student.every = 1
    c.data.update(dict(source="synthetic_pairs", shape=""))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of orpo; use no arg or 'cpu'.")
  return c

