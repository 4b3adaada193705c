"""Hidden-state distillation into a narrower student: learned projections between the widths.

SmolLM2-135M-Instruct (width 576, 30 layers) teaches a random 6-layer student of width 384 on
its own answers to jkd's shipped instructions. Besides generalized JSD on the tokens and a
little cross-entropy, each student layer matches the teacher layer at the same relative depth
(``hidden_state``, TinyBERT's uniform layer map) through a ``[384, 576]`` projection per layer
pair. The projections are the term's own parameters: created from the models' shapes, held in
the train state (``term_params``), trained with the student and checkpointed with it::

  python -m jkd.train --config configs/hidden_kd.py --workdir /tmp/jkd_hidden_kd

Variants: ``cpu`` (a random 128-wide, 4-layer teacher and a 64-wide, 2-layer student on
synthetic data, a few steps: what CI runs).
"""

from jkd.train import recipes

OBJECTIVE = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
             "ce": {"term": "cross_entropy", "weight": 0.1},
             "hidden": {"term": "hidden_state", "weight": 1.0, "metric": "cosine"}}


def get_config(arg=None):
  c = recipes.smollm2_config(OBJECTIVE)
  c.student.source = "random"
  c.student.model.update(dict(num_layers=6, hidden_size=384, intermediate_size=1024,
                              num_heads=6, num_kv_heads=2))
  c.optimizer.update(dict(lr=1e-3))
  if arg == "cpu":
    recipes.cpu_variant(c, steps=4)
    c.teacher.model.update(dict(hidden_size=128, intermediate_size=256))
    c.student.model.update(dict(num_layers=2, hidden_size=64, intermediate_size=128,
                                num_heads=4, num_kv_heads=2))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of hidden_kd; use no arg or 'cpu'.")
  return c
