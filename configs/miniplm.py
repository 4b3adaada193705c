"""MiniPLM: difference sampling with a small reference model, then KD on the kept half.

Every training document is scored by ``avg log p_teacher - avg log p_reference`` and the top
``data.select_fraction`` (0.5) are kept (``data.select="miniplm"``,
:mod:`jkd.train.sources.miniplm`); the student then distils the teacher (forward KL + a little CE) on
them. Default: SmolLM2-135M-Instruct teaching every 5th of its layers on an ``.npz`` of token
arrays (``tokens``, ``labels``, optional ``loss_mask``, e.g. an exported corpus), with a small
reference model of the same tokenizer (``hf:DIR``/``gguf:PATH``)::

  python -m jkd.train --config configs/miniplm.py --workdir /tmp/miniplm \\
      --config.data.path=train.npz --config.data.select_reference=hf:/path/to/small_model

Variant ``cpu``: a random tiny teacher and a 1-layer random reference on synthetic bigram data,
4 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/miniplm.py:cpu --workdir /tmp/miniplm_cpu
"""

import json

from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("miniplm", arg)
  c = recipes.smollm2_config({"kd": {"term": "forward_kl", "weight": 1.0},
                              "ce": {"term": "cross_entropy", "weight": 0.1}},
                              source="npz")
  c.data.update(dict(source="npz", seq_len=256, select="miniplm", select_fraction=0.5))
  c.train.update(dict(steps=500, log_every=10))
  c.eval.update(dict(every=100, at_start=False))
  c.checkpoint.update(dict(every=100))
  if variant == "cpu":
    recipes.tiny_teacher(c, lr=3e-3)
    reference = {**recipes.CPU_TEACHER, "max_position_embeddings": 64, "num_layers": 1,
                 "seed": 7}
    c.data.update(dict(source="synthetic", num_examples=32, eval_examples=8, seq_len=16,
                       batch_size=4, select_reference="random:" + json.dumps(reference)))
    c.eval.update(dict(every=4))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (synthetic data): no config overrides."""
  del workdir, arg
  return {}
