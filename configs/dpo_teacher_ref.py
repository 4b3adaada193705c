"""DPO with the big teacher as the reference of a small student (LLaVA-MoD style).

As in LLaVA-MoD (Shu et al., 2024), the preference stage of a distilled student uses the
**teacher** as DPO's reference model instead of the student's own initial copy: the 6-layer
student (every 5th SmolLM2 layer, or better a student distilled first, ``--init_from``) is pushed
towards the chosen completions relative to how the teacher rates them (sigmoid DPO,
``beta=0.1``)::

  python -m jkd.train --config configs/dpo_teacher_ref.py --workdir /tmp/jkd_dpo_tref \
      --config.data.path=pairs.jsonl --init_from /tmp/jkd_kd_gjsd

Data: ``data.source=preference`` reads ``data.path``, JSONL files of ``{"prompt", "chosen",
"rejected"}`` text (built once into a TFDS dataset under ``data.cache_dir``) or a TFDS
preference dataset directory (e.g. from ``python -m jkd.data.preference make``); prompts go
through the chat template, labels cover the completions only. There is no evaluation set
(``eval.every=0``); the ``dpo/rewards/*`` metrics are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), a student of every 2nd
layer, random token pairs (``data.source=synthetic_pairs``), 3 steps in seconds.
"""

from jkd.train import recipes
from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.teacher.online = True
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1, "loss_type": "sigmoid"}}
  c.optimizer.update(dict(lr=5e-6, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path="", shape="", seq_len=512, batch_size=8))
  c.train.update(dict(steps=500, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=100, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, seq_len=32)
    c.student.every = 2
    c.data.update(dict(source="synthetic_pairs", shape=""))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of dpo_teacher_ref; use no arg or 'cpu'.")
  return c

