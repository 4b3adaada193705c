"""SimPO: SmolLM2-135M-Instruct aligned with preference pairs, without a reference model.

Simple preference optimisation (Meng et al., NeurIPS 2024): the length-averaged log-prob margin
with ``beta=2.0`` and target margin ``gamma = 0.25 beta``. No term reads a reference or a
teacher, so the teacher is read only to initialise the policy as its copy (``every=1``) and then
dropped (``teacher.online=False``)::

  python -m jkd.train --config configs/simpo.py --workdir /tmp/jkd_simpo \\
      --config.data.path=pairs.jsonl

Data and variant ``cpu``: as every preference recipe
(:func:`jkd.train.recipes.preference_config`); ``simpo/rewards/*`` are logged every step.
"""

from jkd.train import recipes


def get_config(arg=None):
  return recipes.preference_config(
      "simpo", {"simpo": {"term": "simpo", "weight": 1.0, "beta": 2.0, "gamma_beta_ratio": 0.25}},
      arg, online=False)
