"""Generalized-JSD distillation (beta 0.5) + 0.1 cross-entropy of SmolLM2-135M-Instruct into
a 6-layer student, teacher online.

The student (every 5th teacher layer) trains on the teacher's answers to jkd's shipped
instructions (``data.source=teacher_corpus``, written into the workdir first) with the
generalized Jensen-Shannon divergence (``beta=0.5``: the symmetric JSD; TRL's convention, 0 is
forward KL, 1 reverse KL) plus 0.1 x the cross-entropy of the corpus tokens::

  python -m jkd.train --config configs/kd_gjsd.py --workdir /tmp/jkd_kd_gjsd

Variants (``--config configs/kd_gjsd.py:<variant>``): ``cache`` (from an offline teacher
cache), ``cpu`` and ``cpu_cache``, as in ``configs/kd_forward.py`` (its docstring has the
commands; :func:`jkd.train.recipes.token_kd_config` builds both).
"""

from jkd.train import recipes

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu", "cpu_cache")


def get_config(arg=None):
  objective = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
               "ce": {"term": "cross_entropy", "weight": 0.1}}
  return recipes.token_kd_config("kd_gjsd", objective, arg)


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
