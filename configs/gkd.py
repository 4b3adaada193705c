"""On-policy GKD: SmolLM2-135M-Instruct distilled into a 6-layer student on its own samples.

GKD (Agarwal et al., ICLR 2024): with probability ``lmbda=0.5`` a batch's completions are
replaced by the student's samples (temperature 0.9) of the batch's prompts, and the teacher
scores whatever the batch holds with the generalized JSD (``beta=0.5``). The prompts and the
off-policy completions are the teacher's answers to jkd's shipped instructions
(``data.source=teacher_corpus``)::

  python -m jkd.train --config configs/gkd.py --workdir /tmp/jkd_gkd

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), synthetic data, every
batch on-policy (``lmbda=1``, so CI exercises the sampler), 3 steps in seconds.
"""

from jkd.train import recipes
from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5}}
  c.onpolicy.update(dict(mode="gkd", lmbda=0.5, temperature=0.9, top_p=1.0, max_new_tokens=64,
                         eos_id=2, pad_id=2))  # SmolLM2's <|im_end|>.
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="teacher_corpus", seq_len=160, batch_size=8))
  c.corpus.update(dict(max_new_tokens=64, batch_size=16))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=50, at_start=True))
  c.checkpoint.update(dict(every=50, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c)
    c.onpolicy.update(dict(lmbda=1.0, eos_id=-1, pad_id=0))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of gkd; use no arg or 'cpu'.")
  return c
