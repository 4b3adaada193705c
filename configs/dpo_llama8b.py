"""DPO of a Llama-3.1-8B-shaped student with its Llama-3.1-70B teacher as the reference, v5p-64.

The preference stage after distillation, at pod scale: sigmoid DPO (``beta=0.1``) of the 8B
student (``--init_from`` the distilled checkpoint) against the 70B teacher's log-probs of the
chosen and rejected completions, computed in the step (``teacher.online=True``, bfloat16).
32 pairs of 2048 tokens per step, plain FSDP over the 32 chips of a v5p-64::

  python -m jkd.plan --config configs/dpo_llama8b.py --topology v5p-64
  python -m jkd.train --config configs/dpo_llama8b.py --workdir /mnt/runs/dpo_8b \\
    --config.teacher.source=hf:/ckpt/Llama-3.1-70B-Instruct \\
    --config.data.path=/data/pairs.jsonl --init_from /mnt/runs/70b_to_8b

Plan on a v5p-64 (``bench/plan.py``), per chip: 6.91 GiB arguments (student, Adam state and the
bf16 70B reference, sharded 32 ways) + 9.86 GiB temporaries = 16.78 GiB of 95; roofline step
>= 1681 ms.

Variant ``cpu``: the CPU teacher as the reference of its every-2nd-layer student on random
token pairs, 3 steps (CI).
"""

from jkd.train import config
from jkd.train import recipes


def get_config(arg=None):
  variant = recipes.check_variant("dpo_llama8b", arg, ("cpu",))
  c = config.default_config()
  recipes.pod_config(c, teacher="llama-3.1-70b", student="llama-3.1-8b", mesh=(1, 32, 1),
                     batch_size=32, seq_len=2048)
  c.objective = {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.1, "loss_type": "sigmoid"}}
  c.optimizer.update(dict(lr=5e-7, warmup_steps=50, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path=""))
  c.train.update(dict(steps=2000, peak_tflops_per_device=459.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=200, keep=2))
  if variant == "cpu":
    recipes.pod_cpu_variant(c, seq_len=32)
    c.data.update(dict(source="synthetic_pairs"))
  return c
