"""Step-DPO: SmolLM2-135M-Instruct aligned step by step on reasoning chains.

Step-wise preference optimisation (Lai et al., arXiv:2406.18629, 2024) is DPO whose context is
the question **and the correct reasoning steps so far**, and whose two completions are one
correct and one wrong next step (sigmoid DPO, ``beta=0.5`` as the authors' 7B run). Data: JSONL
lines ``{"prompt", "prefix", "chosen_step", "rejected_step"}`` (``data.source="step_pairs"``,
:mod:`jkd.data.ranked`): the prompt is a user turn, the prefix starts the assistant's answer in
the same turn, and the labels cover the step only (no EOS after it: the answer goes on). The
policy starts as a copy of the teacher (``every=1``) and the frozen teacher is the reference::

  python -m jkd.train --config configs/step_dpo.py --workdir /tmp/jkd_step_dpo \\
      --config.data.path=steps.jsonl

``dpo/rewards/*`` (of the next step) are logged every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32, character tokenizer), the
policy a copy of it, 8 arithmetic step pairs (:func:`make_cpu_data` writes the JSONL; ``python
configs/step_dpo.py DIR`` prints the override), 3 steps in seconds (what CI runs)::

  python -m jkd.train --config configs/step_dpo.py:cpu --workdir /tmp/jkd_step_dpo_cpu \\
      --config.data.path=DIR/step_dpo_cpu.jsonl
"""

import json
import os

from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)

#: The cpu variant's step pairs: (question, correct prefix, correct step, wrong step).
_CPU_STEPS = [
    ("2+3*4?", "Step 1: 3*4=12.\n", "Step 2: 2+12=14.", "Step 2: 2+12=15."),
    ("2+3*4?", "", "Step 1: 3*4=12.\n", "Step 1: 2+3=5.\n"),
    ("(1+2)*3?", "Step 1: 1+2=3.\n", "Step 2: 3*3=9.", "Step 2: 3*3=6."),
    ("(1+2)*3?", "", "Step 1: 1+2=3.\n", "Step 1: 2*3=6.\n"),
    ("10-4/2?", "Step 1: 4/2=2.\n", "Step 2: 10-2=8.", "Step 2: 10-2=3."),
    ("10-4/2?", "", "Step 1: 4/2=2.\n", "Step 1: 10-4=6.\n"),
    ("5*2+1?", "Step 1: 5*2=10.\n", "Step 2: 10+1=11.", "Step 2: 10+1=12."),
    ("5*2+1?", "", "Step 1: 5*2=10.\n", "Step 1: 2+1=3.\n"),
]


def get_config(arg=None):
  c = recipes.preference_config("step_dpo", {"dpo": {"term": "dpo", "weight": 1.0, "beta": 0.5,
                                                     "loss_type": "sigmoid"}}, arg)
  c.data.update(dict(source="step_pairs"))
  if arg == "cpu":
    c.data.update(dict(source="step_pairs", seq_len=48))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """Writes the cpu variant's step pairs (:data:`_CPU_STEPS`) as JSONL under ``workdir``.

  Returns:
    ``{"data.path": the file}``.
  """
  del arg
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "step_dpo_cpu.jsonl")
  with open(path, "w") as f:
    for prompt, prefix, chosen, rejected in _CPU_STEPS:
      f.write(json.dumps({"prompt": prompt, "prefix": prefix, "chosen_step": chosen,
                          "rejected_step": rejected}) + "\n")
  return {"data.path": path}


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
