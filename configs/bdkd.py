"""BD-KD: SmolLM2-135M-Instruct distilled into a 6-layer student with the balanced divergence.

BD-KD (Amara et al., *BD-KD: Balancing the Divergences for Online Knowledge Distillation*,
arXiv:2212.12965, 2022): per token, forward KL weighted by the teacher's entropy and reverse KL
by the student's (normalised to sum to 1, constants for the gradient), so that a student less
certain than the teacher is sharpened (reverse KL) and a more certain one spread (forward KL);
plus 0.1 x the cross-entropy of the corpus tokens. The teacher is fixed here (the paper's
online setting also trains the teacher; jkd distils from a frozen one). Data: the teacher's
answers to jkd's shipped instructions (``data.source=teacher_corpus``)::

  python -m jkd.train --config configs/bdkd.py --workdir /tmp/jkd_bdkd

Variants (``--config configs/bdkd.py:<variant>``): ``cache`` (from an offline teacher cache,
``teacher.online=False``: the balanced divergence over the cached top-k plus a tail bin),
``cpu`` and ``cpu_cache`` (a random 4-layer teacher of vocabulary 128 and width 32, synthetic
data, 3 steps; CI runs ``cpu``), as in ``configs/kd_forward.py``.
"""

from jkd.train import recipes

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu",)

OBJECTIVE = {"kd": {"term": "balanced_kl", "weight": 1.0, "temperature": 1.0},
             "ce": {"term": "cross_entropy", "weight": 0.1}}


def get_config(arg=None):
  return recipes.token_kd_config("bdkd", OBJECTIVE, arg)


def make_cpu_data(workdir, arg="cpu"):
  """The data a CPU variant reads from disk, written under ``workdir``.

  Returns:
    Config overrides (``{"data.path": ...}`` for ``cpu_cache``; ``{}`` for ``cpu``).
  """
  from jkd.train import recipe_data  # pylint: disable=import-outside-toplevel
  return recipe_data.token_kd_cpu_data(get_config(arg), workdir, arg)
