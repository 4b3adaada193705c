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

from jkd.train import recipes
from jkd.train.config import default_config


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"kd": {"term": "skew_kl", "weight": 1.0, "alpha": 0.1}}
  c.onpolicy.update(dict(mode="distillm", lmbda=0.5, temperature=1.0, top_p=1.0,
                         max_new_tokens=64, eos_id=2, pad_id=2, buffer_size=1000, p_step=0.1,
                         metric="eval/kl_forward"))
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="teacher_corpus", seq_len=160, batch_size=8))
  c.corpus.update(dict(max_new_tokens=64, batch_size=16))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=20, at_start=True))
  c.checkpoint.update(dict(every=100, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, steps=4)
    c.onpolicy.update(dict(eos_id=-1, pad_id=0, p_step=0.5))
    c.eval.update(dict(every=1))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of distillm; use no arg or 'cpu'.")
  return c
