"""QCRD: quality-guided contrastive rationale distillation (issue 18, item 8).

The teacher samples ``qcrd.positives`` rationales per prompt at ``teacher_temperature`` (0.7);
self-consistency keeps those that reach the majority answer (``qcrd.answer_pattern``, a regex
whose first group is the answer; ``""`` for open-ended prompts: every non-empty sample). Every
``qcrd.steps_per_round`` steps the current student samples ``qcrd.negatives`` rationales per
prompt at the high ``negative_temperature`` (1.5): its own low-quality rationales. Positives and
negatives are paired and the ``qcrd`` term trains the student with likelihood on the positives
and unlikelihood on the negatives, each weighted by the teacher's judgement of its quality
(:func:`jkd.losses.qcrd_loss`, :mod:`jkd.train.sources.qcrd`, docs/methods.md §17). Default:
SmolLM2-135M-Instruct teaching every 5th of its layers on the shipped instructions::

  python -m jkd.train --config configs/qcrd.py --workdir /tmp/qcrd

On prompts with checkable answers (a JSONL of ``{"prompt": ...}`` whose rationales end with
"The answer is X")::

  python -m jkd.train --config configs/qcrd.py --workdir /tmp/qcrd_math \\
      --config.qcrd.prompts=math.jsonl '--config.qcrd.answer_pattern=answer is\\s*(\\S+)'

Variant ``cpu``: a random tiny teacher with a character tokenizer (vocabulary 128), 4 prompts,
2 rounds of 2 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/qcrd.py:cpu --workdir /tmp/qcrd_cpu
"""

from jkd.train import config
from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("qcrd", arg)
  c = recipes.smollm2_config({"qcrd": {"term": "qcrd", "weight": 1.0, "weighting": "teacher",
                                       "negative_weight": 1.0}}, source="qcrd")
  c.optimizer.update(dict(lr=1e-4, warmup_steps=5))
  c.data.update(dict(source="qcrd", seq_len=192))
  config.add_sections(c, "qcrd")
  c.qcrd.update(dict(steps_per_round=25, positives=4, negatives=2, teacher_temperature=0.7,
                     negative_temperature=1.5, max_new_tokens=64, limit=64,
                     generate_batch_size=16))
  c.train.update(dict(steps=100))
  c.eval.update(dict(every=0, at_start=False))
  c.checkpoint.update(dict(every=25))
  if variant == "cpu":
    recipes.tiny_teacher(c, max_position_embeddings=256, char_tokenizer=True)
    c.data.update(dict(seq_len=96, batch_size=4))
    c.qcrd.update(dict(steps_per_round=2, positives=2, negatives=2, max_new_tokens=6, limit=4,
                       generate_batch_size=8))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (shipped prompts): no config overrides."""
  del workdir, arg
  return {}
