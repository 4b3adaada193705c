"""Llama-3.1-8B -> a Llama-3.2-1B-shaped student (same tokenizer): token-level KD on a v5e-16.

Generalized JSD (``beta=0.5``) + 0.1 cross-entropy, the teacher online in bfloat16, the student
in float32 master weights with bfloat16 compute and rematerialised layers, AdamW, a global
batch of 16 x 2048 tokens, plain FSDP over the 16 chips (``mesh.shape=(1, 16, 1)``) and no
gradient accumulation. Plan it (libtpu's TPU compiler, on any machine; no TPU needed)::

  python -m jkd.plan --config configs/llama8b_to_1b.py --topology v5e-16

The config gives both models by shape (``teacher.source=random``), which is all a plan reads.
The real run names the teacher's checkpoint (its ``config.json`` has these shapes) and data::

  python -m jkd.train --config configs/llama8b_to_1b.py --workdir /mnt/runs/8b_to_1b \\
    --config.teacher.source=hf:/ckpt/Llama-3.1-8B-Instruct \\
    --config.data.source=jsonl --config.data.path=/data/train.jsonl

Plan on a v5e-16 (libtpu 0.0.42.1's TPU compiler, jax 0.10.2; ``bench/plan.py``), per chip
of 16 GiB HBM: arguments (student + Adam state + bf16 teacher shards) 1.80 GiB + temporaries
5.58 GiB = 7.38 GiB; ``:fused`` 1.80 + 2.26 = 4.06 GiB. Roofline step >= 243 ms (model FLOPs
at the bf16 peak). Before activation sharding constraints (#16) this step needed 36.7 GiB.

Variants (``--config configs/llama8b_to_1b.py:<variant>``, combinable with commas):

- ``fused``: the fused (chunked) loss terms, which never hold the ``[tokens, 128256]`` logits.
- ``small``: the same widths, heads and vocabulary with 2 teacher and 2 student layers: a plan
  that compiles in under a minute.
- ``cpu``: the same objective on the CPU teacher (vocabulary 128, width 32), 3 steps (CI).
"""

from jkd.train import config
from jkd.train import recipes


def get_config(arg=None):
  c = config.default_config()
  recipes.pod_config(c, teacher="llama-3.1-8b", student="llama-3.2-1b", mesh=(1, 16, 1),
                     batch_size=16, seq_len=2048)
  c.objective = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
                 "ce": {"term": "cross_entropy", "weight": 0.1}}
  c.optimizer.update(dict(lr=1e-4, warmup_steps=200, weight_decay=0.1))
  c.data.source = "jsonl"
  c.train.update(dict(steps=10000, peak_tflops_per_device=197.0))
  c.eval.update(dict(every=500, batches=8))
  c.checkpoint.update(dict(every=500, keep=3))
  for variant in (arg or "").split(","):
    if variant == "fused":
      for term in c.objective.values():
        term["fused"] = True
    elif variant == "small":
      c.teacher.model.num_layers = 2
      c.student.model.num_layers = 2
    elif variant == "cpu":
      recipes.pod_cpu_variant(c)
    elif variant:
      raise ValueError(f"unknown variant {variant!r} of llama8b_to_1b; use fused, small, cpu"
                       " or several joined by commas.")
  return c
