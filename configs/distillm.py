"""DistiLLM: SmolLM2-135M-Instruct distilled into a 6-layer student with the skew KL and
adaptive off-policy student samples.

DistiLLM (Ko et al., ICML 2024): the loss is the skew KL ``KL(p || 0.1 p + 0.9 q)`` (teacher
``p``, student ``q``; ``alpha=0.1``); a share ``p`` of each batch's rows are the student's
samples, replayed from a buffer of 1000 or, with probability ``lmbda=0.5``, fresh; ``p`` starts
at 0 and grows by 0.1 whenever the validation KL (``eval/kl_forward``, every ``eval.every``
steps) fails to improve. Data: the teacher's answers to jkd's shipped instructions::

  python -m jkd.train --config configs/distillm.py --workdir /tmp/jkd_distillm

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), synthetic data, 4 steps
with an evaluation after each (so ``p`` moves and student samples enter the batches).
"""

from jkd.train import config
from jkd.train import recipes


def get_config(arg=None):
  c = recipes.smollm2_config({"kd": {"term": "skew_kl", "weight": 1.0, "alpha": 0.1}})
  config.add_sections(c, "onpolicy")
  c.onpolicy.update(dict(mode="distillm", lmbda=0.5, temperature=1.0, top_p=1.0,
                         max_new_tokens=64, eos_id=2, pad_id=2, buffer_size=1000, p_step=0.1,
                         metric="eval/kl_forward"))
  c.eval.update(dict(every=20))
  c.checkpoint.update(dict(every=100))
  if arg == "cpu":
    recipes.cpu_variant(c, steps=4)
    c.onpolicy.update(dict(eos_id=-1, pad_id=0, p_step=0.5))
    c.eval.update(dict(every=1))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of distillm; use no arg or 'cpu'.")
  return c
