"""Dual-head distillation (DHO): SmolLM2-135M-Instruct taught into a 6-layer student with two
output heads on one backbone.

DHO (Kang et al., *Simple yet Effective Semi-supervised Knowledge Distillation from
Vision-Language Models via Dual-Head Optimization*, arXiv:2505.07675, 2025): the student's own
head learns the labels (``cross_entropy``), a second head learns the teacher (``dual_head``:
forward KL at temperature 2, ``T**2``-scaled), both weighted 0.5 as in the authors' code, so the
two signals meet only in the backbone. The second head is the term's parameter in the train state
(``term_params``), started equal to the main head (``head="delta"``: ``A = sg(W) + Delta``,
``Delta`` from 0) and checkpointed with the run. Data: the teacher's answers to jkd's shipped
instructions (``data.source=teacher_corpus``)::

  python -m jkd.train --config configs/dual_head.py --workdir /tmp/jkd_dual_head
  python -m jkd.export --workdir /tmp/jkd_dual_head --out /tmp/jkd_dual_head/export \\
      --dual_head merge --alpha 0.5 --beta 1.0

The export mixes the heads at the logit level (one linear head, ``alpha W + (1-alpha) A /
beta``); ``jkd.losses.dual_head_logprobs`` gives the paper's probability mixture. The engine's
evaluation scores the main head alone. Variant ``cpu``: a random 4-layer teacher (vocabulary
128, width 32), synthetic data, 4 steps.
"""

from jkd.train import recipes

OBJECTIVE = {"ce": {"term": "cross_entropy", "weight": 0.5},
             "dual_head": {"term": "dual_head", "weight": 0.5, "divergence": "forward_kl",
                           "temperature": 2.0, "head": "delta"}}


def get_config(arg=None):
  c = recipes.smollm2_config(OBJECTIVE)
  if recipes.check_variant("dual_head", arg) == "cpu":
    recipes.cpu_variant(c, steps=4)
  return c
