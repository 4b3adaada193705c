"""KTO: SmolLM2-135M-Instruct aligned from unpaired desirable/undesirable completions.

Kahneman-Tversky optimisation (Ethayarajh et al., ICML 2024; ``beta=0.1``). Each preference pair
gives two unpaired rows (``data.shape=unpaired``): its chosen completion (desirable) and its
rejected one (undesirable); the reference point is the KL estimated on mismatched
prompt-completion rows, built in the step. The policy starts as a copy of the teacher
(``every=1``); the frozen teacher is the reference::

  python -m jkd.train --config configs/kto.py --workdir /tmp/jkd_kto --config.data.path=pairs.jsonl

Data: ``data.source=preference`` reads ``data.path``, JSONL files of ``{"prompt", "chosen",
"rejected"}`` text (built once into a TFDS dataset under ``data.cache_dir``) or a TFDS
preference dataset directory (e.g. from ``python -m jkd.data.preference make``); prompts go
through the chat template, labels cover the completions only. There is no evaluation set
(``eval.every=0``); the ``kto/kl`` metrics are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), the policy a copy of it,
random token pairs (``data.source=synthetic_pairs``, ``data.shape=unpaired``), 3 steps in
seconds.
"""

from jkd.train import recipes
from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.teacher.online = True
  c.student.source = "layers"
  c.student.every = 1
  c.objective = {"kto": {"term": "kto", "weight": 1.0, "beta": 0.1}}
  c.optimizer.update(dict(lr=1e-6, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path="", shape="unpaired", seq_len=512, batch_size=8))
  c.train.update(dict(steps=500, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=100, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, seq_len=32)
    c.student.every = 1
    c.data.update(dict(source="synthetic_pairs", shape="unpaired"))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of kto; use no arg or 'cpu'.")
  return c

