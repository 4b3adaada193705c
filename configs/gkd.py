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

from jkd.train import config
from jkd.train import recipes


def get_config(arg=None):
  c = recipes.smollm2_config({"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5}})
  config.add_sections(c, "onpolicy")
  c.onpolicy.update(dict(mode="gkd", lmbda=0.5, temperature=0.9, top_p=1.0, max_new_tokens=64,
                         eos_id=2, pad_id=2))  # SmolLM2's <|im_end|>.
  if arg == "cpu":
    recipes.cpu_variant(c)
    c.onpolicy.update(dict(lmbda=1.0, eos_id=-1, pad_id=0))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of gkd; use no arg or 'cpu'.")
  return c
