"""DPO: SmolLM2-135M-Instruct aligned with preference pairs, the teacher as the reference.

Direct preference optimisation (Rafailov et al., NeurIPS 2023; sigmoid loss, ``beta=0.1``).
The policy starts as a copy of the teacher (``student.source=layers`` with ``every=1``) and the
frozen teacher is the reference model, run inside the step over chosen and rejected::

  python -m jkd.train --config configs/dpo.py --workdir /tmp/jkd_dpo --config.data.path=pairs.jsonl

Data and variant ``cpu``: as every preference recipe
(:func:`jkd.train.recipes.preference_config`); ``dpo/rewards/*`` are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), the policy a copy of it,
random token pairs (``data.source=synthetic_pairs``), 3 steps in seconds; tests/test_configs.py
also runs it on a tiny JSONL file of text pairs (``data.source=preference``, the CPU teacher's
character tokenizer).
"""

from jkd.train import recipes


def get_config(arg=None):
  return recipes.preference_config("dpo", {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1,
                                                 "loss_type": "sigmoid"}}, arg)
