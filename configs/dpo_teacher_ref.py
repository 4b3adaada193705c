"""DPO with the big teacher as the reference of a small student (LLaVA-MoD style).

As in LLaVA-MoD (Shu et al., 2024), the preference stage of a distilled student uses the
**teacher** as DPO's reference model instead of the student's own initial copy: the 6-layer
student (every 5th SmolLM2 layer, or better a student distilled first, ``--init_from``) is pushed
towards the chosen completions relative to how the teacher rates them (sigmoid DPO,
``beta=0.1``)::

  python -m jkd.train --config configs/dpo_teacher_ref.py --workdir /tmp/jkd_dpo_tref \
      --config.data.path=pairs.jsonl --init_from /tmp/jkd_kd_gjsd

Data and variant ``cpu``: as every preference recipe
(:func:`jkd.train.recipes.preference_config`); ``dpo/rewards/*`` are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), a student of every 2nd
layer, random token pairs (``data.source=synthetic_pairs``), 3 steps in seconds.
"""

from jkd.train import recipes


def get_config(arg=None):
  return recipes.preference_config(
      "dpo_teacher_ref", {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1,
                                  "loss_type": "sigmoid"}}, arg, every=5, cpu_every=2, lr=5e-6)
