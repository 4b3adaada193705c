"""KTO: SmolLM2-135M-Instruct aligned from unpaired desirable/undesirable completions.

Kahneman-Tversky optimisation (Ethayarajh et al., ICML 2024; ``beta=0.1``). Each preference pair
gives two unpaired rows (``data.shape=unpaired``): its chosen completion (desirable) and its
rejected one (undesirable); the reference point is the KL estimated on mismatched
prompt-completion rows, built in the step. The policy starts as a copy of the teacher
(``every=1``); the frozen teacher is the reference::

  python -m jkd.train --config configs/kto.py --workdir /tmp/jkd_kto --config.data.path=pairs.jsonl

Data and variant ``cpu``: as every preference recipe
(:func:`jkd.train.recipes.preference_config`); ``kto/kl`` are logged every step.
"""

from jkd.train import recipes


def get_config(arg=None):
  return recipes.preference_config(
      "kto", {"kto": {"term": "kto", "weight": 1.0, "beta": 0.1}}, arg, shape="unpaired")
