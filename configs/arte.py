"""ARTE: a teacher tuned to its student writes the corpus the student learns.

ARTE (Liu et al., arXiv 2406.19227, 2024; ``data.source="arte_corpus"``,
:mod:`jkd.train.sources.arte`): the teacher drafts ``arte.n`` answers to each of
``arte.prompts`` training prompts, the initial student ranks the drafts by how much one SGD step
on each lowers its NLL on a validation set of the target distribution, the best and the worst
draft of each prompt train a copy of the teacher with DPO, and the tuned teacher answers every
training prompt; the student then learns that corpus by cross-entropy (sequence-level, as the
paper fine-tunes on the tailored set; the teacher is not kept for the step). Default:
SmolLM2-135M-Instruct and a student of every 5th of its layers on the shipped instructions
(the held-out prompts: half validation, half evaluation)::

  python -m jkd.train --config configs/arte.py --workdir /tmp/arte

The untuned baseline (the same run without DPO: the teacher writes the corpus directly)::

  python -m jkd.train --config configs/arte.py --workdir /tmp/arte_untuned --config.arte.tune=False

Variant ``cpu`` (tests/test_arte.py runs it, tuned and untuned): a tiny 2-layer teacher trained
first (``make_cpu_data``, seconds) on answers that are half a target letter chain and half an
off-target one, a fresh random 1-layer student (a layer-subset copy of so small a teacher starts
worse than uniform, and its one-step gains mostly measure repairing it), validation and eval
sets of target chains (:mod:`jkd.train.arte_cpu`), 16 prompts drafted 4 times, 8 DPO steps and
8 training steps::

  python -m jkd.train --config configs/arte.py:cpu --workdir /tmp/arte_cpu \\
      $(python configs/arte.py /tmp/arte_cpu_data)

(``python configs/arte.py DIR`` writes the variant's files and teacher under ``DIR`` and prints
the overrides that use them, those of ``make_cpu_data``).
"""

from jkd.train import config
from jkd.train import recipes

#: The variants CI runs end to end (tests/test_arte.py).
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("arte", arg)
  c = recipes.smollm2_config({"ce": {"term": "cross_entropy", "weight": 1.0}},
                             source="arte_corpus")
  config.add_sections(c, "corpus", "arte")
  c.teacher.online = False
  c.corpus.update(dict(max_new_tokens=64, batch_size=16, temperature=0.7, top_p=0.95))
  c.arte.update(dict(prompts=64, n=4, temperature=1.0, lookahead_lr=1e-3, lookahead_steps=1,
                     score_batch_size=4, beta=0.1, dpo_steps=50, dpo_lr=5e-6,
                     dpo_batch_size=8))
  if variant == "cpu":
    recipes.tiny_teacher(c, steps=8, lr=1e-2, max_position_embeddings=64, char_tokenizer=True)
    c.teacher.model.num_layers = 2
    c.student.source = "random"
    c.student.model.num_layers = 1
    c.data.update(dict(seq_len=24, batch_size=8))
    c.corpus.update(dict(max_new_tokens=16, batch_size=64, temperature=1.0, top_p=1.0))
    c.arte.update(dict(prompts=16, n=4, lookahead_lr=0.1, score_batch_size=16, dpo_steps=8,
                       dpo_lr=3e-3, dpo_batch_size=8))
    c.train.update(dict(progress_bar=False, peak_tflops_per_device=1.0))
    c.eval.update(dict(every=0, at_start=True))
    c.checkpoint.update(dict(every=0, keep=1, async_save=False))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant's prompts, target sets and trained tiny teacher (jkd.train.arte_cpu)."""
  from jkd.train import arte_cpu  # noqa: PLC0415  (engine code, imported when needed)
  return arte_cpu.write_cpu_task(get_config(arg), workdir)


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
