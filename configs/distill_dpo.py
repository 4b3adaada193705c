"""Distillation-DPO: the student's own samples, ranked by the teacher, in rounds (issue 7).

Every ``rounds.steps_per_round`` steps the current student samples ``rounds.n`` completions for
each prompt (the shipped instructions, ``jkd/data/prompts``), the teacher ranks them by its mean
log-likelihood, and the best and the worst of each prompt make a pair; DPO trains on the
round's pairs with the frozen teacher as the reference (:mod:`jkd.train.sources.rounds`,
``data.source="rounds"``). Default: SmolLM2-135M-Instruct teaching every 5th of its layers::

  python -m jkd.train --config configs/distill_dpo.py --workdir /tmp/distill_dpo

Variant ``cpu``: a random tiny teacher with a character tokenizer (vocabulary 128), 4 prompts,
2 rounds of 2 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/distill_dpo.py:cpu --workdir /tmp/distill_dpo_cpu
"""

from jkd.train import config
from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("distill_dpo", arg)
  c = recipes.smollm2_config({"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1},
                              "ce": {"term": "cross_entropy", "weight": 0.1}},
                              source="rounds")
  c.optimizer.update(dict(lr=1e-4, warmup_steps=5))
  c.data.update(dict(source="rounds", seq_len=192))
  config.add_sections(c, "rounds")
  c.rounds.update(dict(steps_per_round=25, n=4, max_new_tokens=64, temperature=1.0, limit=64,
                       generate_batch_size=16))
  c.train.update(dict(steps=100))
  c.eval.update(dict(every=0, at_start=False))
  c.checkpoint.update(dict(every=25))
  if variant == "cpu":
    recipes.tiny_teacher(c, max_position_embeddings=256, char_tokenizer=True)
    c.data.update(dict(seq_len=160, batch_size=4))
    c.rounds.update(dict(steps_per_round=2, n=2, max_new_tokens=6, limit=4,
                         generate_batch_size=8))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (shipped prompts): no config overrides."""
  del workdir, arg
  return {}
