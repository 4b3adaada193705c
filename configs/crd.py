"""CRD + KD: SmolLM2-135M-Instruct distilled into a narrower student, with a contrastive loss
between the two models' final hidden states.

CRD (Tian, Krishnan and Isola, *Contrastive Representation Distillation*, ICLR 2020): each
sequence's mean final hidden state, of the student (width 384) and of the teacher (576), is
projected by a trainable linear map to 128 dimensions and L2-normalised; InfoNCE at temperature
0.07 asks each student embedding to find its teacher embedding among the batch's others and
among a memory bank of the last 1024 teacher embeddings, 128 steps of 8 sequences (and
symmetrically). The projections are the term's parameters (trained with the student,
checkpointed with it); the bank is the term's state, filled after every step. Beside it:
forward KL on the tokens and 0.1 x cross-entropy, on the teacher's answers to jkd's shipped
instructions (``data.source=teacher_corpus``)::

  python -m jkd.train --config configs/crd.py --workdir /tmp/jkd_crd

With ``train.grad_accum > 1`` each micro-batch's rows are in-batch negatives of each other
only, and all of the step's rows enter the bank (see docs/methods.md §5.7).

Variant ``cpu``: a random 128-wide, 4-layer teacher and a 64-wide, 2-layer student on synthetic
data, 4 steps, a bank of 8 (it fills and wraps around): what CI runs.
"""

from jkd.train import recipes

OBJECTIVE = {"kd": {"term": "forward_kl", "weight": 1.0},
             "ce": {"term": "cross_entropy", "weight": 0.1},
             "crd": {"term": "crd", "weight": 0.8, "feature_dim": 128, "temperature": 0.07,
                     "pooling": "sequence", "memory_size": 1024}}


def get_config(arg=None):
  variant = recipes.check_variant("crd", arg)
  c = recipes.smollm2_config(OBJECTIVE)
  c.student.source = "random"
  c.student.model.update(dict(num_layers=6, hidden_size=384, intermediate_size=1024,
                              num_heads=6, num_kv_heads=2))
  c.optimizer.update(dict(lr=1e-3))
  if variant == "cpu":
    recipes.cpu_variant(c, steps=4)
    c.teacher.model.update(dict(hidden_size=128, intermediate_size=256))
    c.student.model.update(dict(num_layers=2, hidden_size=64, intermediate_size=128,
                                num_heads=4, num_kv_heads=2))
    c.objective.crd.update(dict(feature_dim=16, memory_size=8))
  return c
