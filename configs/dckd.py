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

from jkd.train.config import default_config

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = {"dckd": {"term": "dckd", "weight": 1.0, "k": 50, "kd_weight": 0.1}}
  c.optimizer.update(dict(lr=5e-5, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", seq_len=256, batch_size=8))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=50, keep=2))
  if arg == "cpu":
    c.teacher.source = "random"
    c.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                num_layers=4, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=64))
    c.student.every = 2
    c.objective.dckd.k = 8
    c.optimizer.update(dict(lr=1e-3, warmup_steps=1))
    c.data.update(dict(source="synthetic_pairs", num_examples=16, seq_len=16, batch_size=4))
    c.train.update(dict(steps=4, log_every=1))
    c.checkpoint.update(dict(every=2, keep=2))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of dckd; use no arg or 'cpu'.")
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The cpu variant needs no files (synthetic pairs): no config overrides."""
  del workdir, arg
  return {}
