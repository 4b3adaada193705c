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

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu", "cpu_cache")


def get_config(arg=None):
  return recipes.token_kd_config("kd_forward", {"kd": {"term": "forward_kl", "weight": 1.0}}, arg)


def make_cpu_data(workdir, arg="cpu"):
  """The data a CPU variant reads from disk, written under ``workdir``.

  Returns:
    Config overrides (``{"data.path": ...}`` for ``cpu_cache``; ``{}`` for ``cpu``).
  """
  from jkd.train import recipe_data  # pylint: disable=import-outside-toplevel
  return recipe_data.token_kd_cpu_data(get_config(arg), workdir, arg)


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in
                 make_cpu_data(sys.argv[1], "cpu_cache").items()))
