"""Qwen3-8B -> Qwen3-1.7B (or 0.6B), on-policy GKD, planned for a v5e-16.

GKD (Agarwal et al., ICLR 2024) at pod scale: with probability ``lmbda=0.5`` a batch's
completions are the student's own samples (temperature 0.9) of the batch's prompts, and the
teacher (online, bfloat16) scores the batch with the generalized JSD (``beta=0.5``). Global
batch 32 x 1024 tokens, plain FSDP over 16 chips::

  python -m jkd.plan --config configs/qwen3_8b_gkd.py --topology v5e-16
  python -m jkd.train --config configs/qwen3_8b_gkd.py --workdir /mnt/runs/qwen3_gkd \\
    --config.teacher.source=hf:/ckpt/Qwen3-8B --config.data.source=jsonl \\
    --config.data.path=/data/prompts_and_answers.jsonl

Plan on a v5e-16 (``bench/plan.py``), per chip: the training step 2.16 GiB arguments + 5.60 GiB
temporaries = 7.76 GiB of 16 (the 0.6B student: 6.23 GiB), roofline step >= 271 ms; the
sampler's program (32 rows, 1024-token prompts, 512 new tokens, KV cache 1536) 0.40 + 4.45 =
4.85 GiB (0.6B: 1.95 GiB).

Variants: ``0.6b`` (a Qwen3-0.6B student), ``cpu`` (the CPU teacher, every batch on-policy,
3 steps; CI).
"""

from jkd.train import config
from jkd.train import recipes


def get_config(arg=None):
  variant = recipes.check_variant("qwen3_8b_gkd", arg, ("0.6b", "cpu"))
  c = config.default_config()
  recipes.pod_config(c, teacher="qwen3-8b",
                     student="qwen3-0.6b" if variant == "0.6b" else "qwen3-1.7b",
                     mesh=(1, 16, 1), batch_size=32, seq_len=1024)
  c.objective = {"kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5}}
  c.optimizer.update(dict(lr=5e-5, warmup_steps=100, weight_decay=0.0))
  c.data.source = "jsonl"
  c.train.update(dict(steps=5000, peak_tflops_per_device=197.0))
  c.eval.update(dict(every=500, batches=8))
  c.checkpoint.update(dict(every=500, keep=3))
  config.add_sections(c, "onpolicy")
  c.onpolicy.update(dict(mode="gkd", lmbda=0.5, temperature=0.9, top_p=1.0, max_new_tokens=512,
                         eos_id=151645, pad_id=151643))  # Qwen3's <|im_end|>, <|endoftext|>.
  if variant == "cpu":
    recipes.pod_cpu_variant(c)
    c.onpolicy.update(dict(lmbda=1.0, eos_id=-1, pad_id=0))
  return c
