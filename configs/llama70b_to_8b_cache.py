"""Llama-3.1-70B -> a Llama-3.1-8B-shaped student from an offline top-k teacher cache, v5p-64.

The 70B teacher never enters training memory: ``python -m jkd.data.teacher_cache`` writes its
top-64 log-probs (and the tail's mass) per position once, and the student trains on them with
the sparse forward KL (``teacher.online=False``; the teacher's config gives the student's
vocabulary and tokenizer). Global batch 64 x 4096 tokens, plain FSDP over the 32 chips of a
v5p-64::

  python -m jkd.plan --config configs/llama70b_to_8b_cache.py --topology v5p-64
  python -m jkd.train --config configs/llama70b_to_8b_cache.py --workdir /mnt/runs/70b_to_8b \\
    --config.teacher.source=hf:/ckpt/Llama-3.1-70B-Instruct \\
    --config.data.path=/data/teacher_cache/1.0.0

Plan on a v5p-64 (``bench/plan.py``), per chip: 2.81 GiB arguments (the 8B student and its Adam
state, sharded 32 ways) + 14.66 GiB temporaries = 17.47 GiB of 95; roofline step >= 861 ms.

Variant ``cpu``: the CPU teacher's cache written by ``make_cpu_data``, 3 steps (CI).
"""

from jkd.train import config
from jkd.train import recipes

CPU_VARIANTS = ("cpu",)


def get_config(arg=None):
  variant = recipes.check_variant("llama70b_to_8b_cache", arg, ("cpu",))
  c = config.default_config()
  recipes.pod_config(c, teacher="llama-3.1-70b", student="llama-3.1-8b", mesh=(1, 32, 1),
                     batch_size=64, seq_len=4096)
  c.teacher.online = False
  c.objective = {"kd": {"term": "forward_kl", "weight": 1.0, "fused": True},
                 "ce": {"term": "cross_entropy", "weight": 0.1, "fused": True}}
  c.optimizer.update(dict(lr=5e-5, warmup_steps=200, weight_decay=0.1))
  c.data.update(dict(source="tfds", shape="tokenized", path=""))
  c.train.update(dict(steps=20000, peak_tflops_per_device=459.0))
  c.eval.update(dict(every=1000, batches=8))
  c.checkpoint.update(dict(every=1000, keep=3))
  if variant == "cpu":
    recipes.pod_cpu_variant(c)
    c.data.update(dict(source="tfds", shape="tokenized"))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The CPU variant's teacher cache, written under ``workdir``; returns ``{"data.path": ...}``."""
  from jkd.train import recipe_data  # pylint: disable=import-outside-toplevel
  return recipe_data.write_cpu_teacher_cache(get_config(arg), workdir)
