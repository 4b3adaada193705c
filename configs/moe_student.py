"""A mixture-of-experts student distilled from SmolLM2-135M-Instruct with generalized JSD.

The student is a fresh 6-layer model of the teacher's width whose MLPs are 8 experts of
width 512, 2 routed per token (top-k router with the Switch load-balancing loss, weight 0.01,
logged as ``loss/moe_aux``): about the teacher's active compute per token at a fifth of its
depth. It trains on the teacher's answers to jkd's shipped instructions with the generalized
JSD (``beta=0.5``) plus 0.1 x cross-entropy, the teacher online::

  python -m jkd.train --config configs/moe_student.py --workdir /tmp/jkd_moe_student

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32) and a 2-layer student of 4
experts (2 per token), synthetic data, 3 steps in seconds.
"""

from jkd.train import recipes


def get_config(arg=None):
  c = recipes.smollm2_config({"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
                              "ce": {"term": "cross_entropy", "weight": 0.1}})
  c.student.source = "random"
  c.student.model.update(dict(num_layers=6, intermediate_size=512, num_experts=8,
                              num_experts_per_tok=2, router_aux_loss_coef=0.01))
  c.optimizer.update(dict(lr=1e-3, warmup_steps=50, weight_decay=0.1))
  c.train.update(dict(steps=500, log_every=10))
  c.eval.update(dict(every=100))
  c.checkpoint.update(dict(every=100))
  if arg == "cpu":
    recipes.cpu_variant(c)
    c.student.model.update(dict(num_layers=2, intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of moe_student; use no arg or 'cpu'.")
  return c
