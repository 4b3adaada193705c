"""DCKD: distil a DPO-aligned teacher into a student on preference pairs (issue 7).

``NLL(chosen) + 0.1 * [FKL_top50(teacher || student; chosen) + FKL_top50(...; rejected)]``: the
teacher's top-50 (plus a tail bin) is computed inside the step from its forward pass on both
sequences of each pair (:func:`jkd.losses.dckd_loss`, term ``dckd``). The default distils
SmolLM2-135M-Instruct (instruction-tuned and DPO-aligned) into every 5th of its layers, on text
pairs ``{"prompt", "chosen", "rejected"}`` (JSONL; e.g. written by
``python -m jkd.data.preference make``)::

  python -m jkd.train --config configs/dckd.py --workdir /tmp/dckd --config.data.path=pairs.jsonl

Variant ``cpu``: a random tiny teacher (vocabulary 128, width 32, 4 layers) on random token
pairs, 4 steps (seconds; what CI runs)::

  python -m jkd.train --config configs/dckd.py:cpu --workdir /tmp/dckd_cpu
"""

from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("dckd", arg)
  c = recipes.smollm2_config({"dckd": {"term": "dckd", "weight": 1.0, "k": 50, "kd_weight": 0.1}},
                              source="preference")
  c.optimizer.update(dict(lr=5e-5, warmup_steps=10))
  c.data.update(dict(source="preference", seq_len=256))
  c.eval.update(dict(every=0, at_start=False))
  if variant == "cpu":
    recipes.tiny_teacher(c)
    c.objective.dckd.k = 8
    c.data.update(dict(source="synthetic_pairs", num_examples=16, seq_len=16, batch_size=4))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (synthetic pairs): no config overrides."""
  del workdir, arg
  return {}
