"""TAID: SmolLM2-135M-Instruct distilled into a 6-layer student through an adaptive
intermediate teacher.

TAID (Shing et al., *TAID: Temporally Adaptive Interpolated Distillation*, ICLR 2025): the
target is ``softmax((1 - t) * sg(student logits) + t * teacher logits)`` and the loss its KL to
the student; ``t`` moves from ``t_start=0.4`` to ``t_end=1.0`` over ``train.steps``, faster while
the loss improves (momentum ``beta=0.99``, step ``alpha=5e-4``). ``t`` is training state,
checkpointed with the rest, and logged as ``kd/t``. Data: the teacher's answers to jkd's shipped
instructions (``data.source=teacher_corpus``)::

  python -m jkd.train --config configs/taid.py --workdir /tmp/jkd_taid

``objective.kd.total_steps`` follows ``train.steps`` (also when overridden on the command line).
Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), synthetic data, 3 steps.
"""

from jkd.train import recipes


def get_config(arg=None):
  c = recipes.smollm2_config({"kd": {"term": "taid", "weight": 1.0, "total_steps": 0,
                                     "t_start": 0.4, "t_end": 1.0, "alpha": 5e-4,
                                     "beta": 0.99}})
  c.objective.kd.total_steps = c.train.get_ref("steps")
  if arg == "cpu":
    recipes.cpu_variant(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of taid; use no arg or 'cpu'.")
  return c
