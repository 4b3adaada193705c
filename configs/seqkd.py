"""Sequence-level KD: a 6-layer student fine-tuned on SmolLM2-135M-Instruct's own answers.

Sequence-level knowledge distillation (Kim & Rush, EMNLP 2016): the teacher writes answers to
jkd's shipped instructions (``data.source=teacher_corpus``, greedy-ish sampling, written into the
workdir first) and the student learns them with plain cross-entropy. No token-level term reads
the teacher, so it is not kept for training (``teacher.online=False``: read to write the corpus
and to initialise the student from every 5th layer, then dropped; evaluation reports the
student's metrics)::

  python -m jkd.train --config configs/seqkd.py --workdir /tmp/jkd_seqkd

Variant ``cpu``: a random 4-layer teacher with a character tokenizer writes 8 short answers,
3 steps in seconds.
"""

from jkd.train import recipes
from jkd.train.config import add_sections, default_config


def get_config(arg=None):
  c = add_sections(default_config(), "corpus")
  c.teacher.source = "smollm2"
  c.teacher.online = False
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"ce": {"term": "cross_entropy", "weight": 1.0}}
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="teacher_corpus", seq_len=160, batch_size=8))
  c.corpus.update(dict(max_new_tokens=96, batch_size=16, temperature=0.3, top_p=0.95))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=50, at_start=True))
  c.checkpoint.update(dict(every=50, keep=2))
  if arg == "cpu":
    recipes.cpu_variant(c, seq_len=96)
    c.data.source = "teacher_corpus"
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of seqkd; use no arg or 'cpu'.")
  return c
