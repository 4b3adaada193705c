"""Generate, filter, self-imitate: Symbolic Knowledge Distillation and I2D2 (issue 18, item 10).

Round 0: the teacher over-generates ``self_imitation.n`` completions for each prompt (the shipped
instructions, ``jkd/data/prompts``), a critic scores them (default ``teacher_logprob``: the
teacher's mean log-likelihood; also ``dotted``, ``classifier`` and ``constraints``,
:mod:`jkd.data.critics`), and the top ``keep_fraction`` (and those scoring at least
``threshold``) become the student's training data: cross-entropy on the completions. Every
``self_imitation.steps_per_round`` steps a new round starts in which the current student
generates and the critic filters its own samples (self-imitation). The keep rate and the mean
critic scores of all and of the kept samples are logged per round (``self_imitation/...``;
:mod:`jkd.train.sources.self_imitation`). Default: SmolLM2-135M-Instruct teaching every 5th of
its layers, 3 rounds of 50 steps::

  python -m jkd.train --config configs/self_imitation.py --workdir /tmp/self_imitation

A classifier critic by dotted name (``fn(prompts, texts) -> probabilities``)::

  python -m jkd.train --config configs/self_imitation.py --workdir /tmp/si_clf \\
      --config.self_imitation.critic=classifier  # and critic_options.fn set in the file

Variant ``cpu``: a random tiny teacher with a character tokenizer (vocabulary 128), 4 prompts,
2 rounds of 2 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/self_imitation.py:cpu --workdir /tmp/self_imitation_cpu
"""

from jkd.train import config
from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("self_imitation", arg)
  c = recipes.smollm2_config({"ce": {"term": "cross_entropy", "weight": 1.0}},
                              source="self_imitation")
  c.optimizer.update(dict(lr=1e-4, warmup_steps=5))
  c.data.update(dict(source="self_imitation", seq_len=192))
  config.add_sections(c, "self_imitation")
  c.self_imitation.update(dict(steps_per_round=50, n=4, keep_fraction=0.5, critic="teacher_logprob",
                               max_new_tokens=64, temperature=1.0, limit=64,
                               generate_batch_size=16))
  c.train.update(dict(steps=150))
  c.eval.update(dict(every=0, at_start=False))
  c.checkpoint.update(dict(every=50))
  if variant == "cpu":
    recipes.tiny_teacher(c, max_position_embeddings=256, char_tokenizer=True)
    c.data.update(dict(seq_len=96, batch_size=4))
    c.self_imitation.update(dict(steps_per_round=2, n=2, max_new_tokens=6, limit=4,
                                 generate_batch_size=8))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (shipped prompts): no config overrides."""
  del workdir, arg
  return {}
