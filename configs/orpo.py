"""ORPO: SmolLM2-135M-Instruct fine-tuned and aligned in one step, without a reference.

Odds-ratio preference optimisation (Hong et al., EMNLP 2024): the chosen completion's NLL plus
``lam=0.1`` x the odds-ratio penalty. No reference: the teacher is read only to initialise the
policy as its copy (``every=1``) and then dropped (``teacher.online=False``)::

  python -m jkd.train --config configs/orpo.py --workdir /tmp/jkd_orpo \\
      --config.data.path=pairs.jsonl

Data and variant ``cpu``: as every preference recipe
(:func:`jkd.train.recipes.preference_config`); ``orpo/*`` are logged every step.
"""

from jkd.train import recipes


def get_config(arg=None):
  return recipes.preference_config(
      "orpo", {"orpo": {"term": "orpo", "weight": 1.0, "lam": 0.1}}, arg, online=False, lr=5e-6)
