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

from jkd.train.config import default_config

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1},
                 "ce": {"term": "cross_entropy", "weight": 0.1}}
  c.optimizer.update(dict(lr=1e-4, warmup_steps=5, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="rounds", seq_len=192, batch_size=8))
  c.rounds.update(dict(steps_per_round=25, n=4, max_new_tokens=64, temperature=1.0, limit=64,
                       generate_batch_size=16))
  c.train.update(dict(steps=100, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=25, keep=2))
  if arg == "cpu":
    c.teacher.source = "random"
    c.teacher.tokenizer = "char"
    c.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                num_layers=4, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=256))
    c.student.every = 2
    c.optimizer.update(dict(lr=1e-3, warmup_steps=1))
    c.data.update(dict(seq_len=160, batch_size=4))
    c.rounds.update(dict(steps_per_round=2, n=2, max_new_tokens=6, limit=4,
                         generate_batch_size=8))
    c.train.update(dict(steps=4, log_every=1))
    c.checkpoint.update(dict(every=2, keep=2))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of distill_dpo; use no arg or 'cpu'.")
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (shipped prompts): no config overrides."""
  del workdir, arg
  return {}
