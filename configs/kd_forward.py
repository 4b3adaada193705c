"""Forward-KL distillation of SmolLM2-135M-Instruct into a 6-layer student, teacher online.

The student (every 5th teacher layer) trains on the teacher's answers to jkd's shipped
instructions (``data.source=teacher_corpus``, written into the workdir first) with the token-level
forward KL ``KL(teacher || student)``, the teacher running inside every step::

  python -m jkd.train --config configs/kd_forward.py --workdir /tmp/jkd_kd_forward

Variants (``--config configs/kd_forward.py:<variant>``):

* ``cache``: the same loss from an **offline teacher cache** (``teacher.online=False``: the
  teacher is read only to initialise the student, then dropped; the step reads its top-32 from
  the batch with a remaining-mass bin). Write the cache once, then train on it::

    python -m jkd.data.jsonl --input texts.jsonl --root /tmp/jkd_data --name texts
    python -m jkd.data.teacher_cache --teacher smollm2 --dataset /tmp/jkd_data/texts \\
        --seq_len 256 --k 32 --out /tmp/jkd_data
    python -m jkd.train --config configs/kd_forward.py:cache --workdir /tmp/jkd_kd_cache \\
        --config.data.path=/tmp/jkd_data/teacher_cache

* ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), synthetic data, 3 steps
  (seconds; what CI runs).
* ``cpu_cache``: ``cache`` at that size; ``python configs/kd_forward.py /tmp/kd_cpu`` writes
  its cache (:func:`make_cpu_data`) and prints the ``--config.data.path=...`` to add.
"""

from jkd.train import recipes
from jkd.train.config import default_config

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu", "cpu_cache")


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"kd": {"term": "forward_kl", "weight": 1.0}}
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="teacher_corpus", seq_len=160, batch_size=8))
  c.corpus.update(dict(max_new_tokens=64, batch_size=16))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=50, at_start=True))
  c.checkpoint.update(dict(every=50, keep=2))
  variant = arg or ""
  if variant not in ("", "cache", "cpu", "cpu_cache"):
    raise ValueError(f"unknown variant {arg!r} of kd_forward; use no arg, 'cache', 'cpu' or"
                     " 'cpu_cache'.")
  if variant.startswith("cpu"):
    recipes.cpu_variant(c)
  if variant.endswith("cache"):
    # A cached teacher: the divergence reads teacher_topk_ids/_logprobs/_tail_logprob.
    c.teacher.online = False
    c.data.update(dict(source="tfds", shape="tokenized", path="",
                       seq_len=c.data.seq_len if variant == "cpu_cache" else 256))
    c.eval.at_start = False
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The data a CPU variant reads from disk, written under ``workdir``.

  Returns:
    Config overrides (``{"data.path": ...}`` for ``cpu_cache``; ``{}`` for ``cpu``).
  """
  if arg == "cpu_cache":
    return recipes.write_cpu_teacher_cache(get_config(arg), workdir)
  return {}


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in
                 make_cpu_data(sys.argv[1], "cpu_cache").items()))
