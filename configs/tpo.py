"""TPO: SmolLM2-135M-Instruct aligned with ranked lists of responses (preference trees).

Tree preference optimisation's preference-list ranking (Liao et al., ICLR 2025,
arXiv:2410.12854): each prompt has several responses with graded scores, every response gets
DPO's implicit reward ``beta (log pi - log pi_ref)``, and each pair of responses with different
scores adds a logistic ranking loss weighted by LambdaRank's ``|G_i - G_j| |1/D(tau_i) -
1/D(tau_j)|`` (term ``tpo``, :func:`jkd.losses.tpo_loss`; ``beta=0.1``). The policy starts as a
copy of the teacher (``every=1``) and the frozen teacher is the reference, run over the ``B * K``
responses inside the step. Data: JSONL lines ``{"prompt", "responses": [...], "scores": [...]}``
(``data.source="ranked"``, :mod:`jkd.data.ranked`; lists padded to the longest one)::

  python -m jkd.train --config configs/tpo.py --workdir /tmp/jkd_tpo --config.data.path=lists.jsonl

``tpo/rewards/ranking_accuracy`` (pairs of responses whose implicit rewards are in the scores'
order), ``tpo/rewards/top1`` and ``tpo/rewards/margins`` (best minus worst response) are logged
every step.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32, character tokenizer), the
policy a copy of it, 8 prompts of 2 to 4 scored answers (:func:`make_cpu_data` writes the JSONL;
``python configs/tpo.py DIR`` prints the override), 3 steps in seconds (what CI runs)::

  python -m jkd.train --config configs/tpo.py:cpu --workdir /tmp/jkd_tpo_cpu \\
      --config.data.path=DIR/tpo_cpu.jsonl
"""

import json
import os

from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)

#: The cpu variant's lists: (prompt, [(response, score), ...]) with 2 to 4 responses.
_CPU_LISTS = [
    ("Add 2 and 3.", [("5", 2.0), ("6", 0.5), ("23", 0.0), ("five", 1.5)]),
    ("Add 4 and 4.", [("8", 2.0), ("44", 0.0)]),
    ("Say hi.", [("hi", 1.0), ("bye", 0.0), ("hello", 1.0)]),
    ("Spell cat.", [("c-a-t", 3.0), ("k-a-t", 1.0), ("dog", 0.0)]),
    ("Add 1 and 6.", [("7", 1.0), ("16", 0.0), ("8", 0.25), ("seven", 1.0)]),
    ("Name a color.", [("red", 1.0), ("car", 0.0)]),
    ("Count to 3.", [("1 2 3", 2.0), ("1 3", 1.0), ("3 2 1", 0.5)]),
    ("Double 5.", [("10", 1.0), ("55", 0.0), ("25", 0.0)]),
]


def get_config(arg=None):
  c = recipes.preference_config("tpo", {"tpo": {"term": "tpo", "weight": 1.0, "beta": 0.1,
                                                "weighting": "lambda", "gain": "exp2"}}, arg)
  c.data.update(dict(source="ranked", batch_size=4))
  if arg == "cpu":
    c.data.update(dict(source="ranked", seq_len=32))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """Writes the cpu variant's ranked lists (:data:`_CPU_LISTS`) as JSONL under ``workdir``.

  Returns:
    ``{"data.path": the file}``.
  """
  del arg
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "tpo_cpu.jsonl")
  with open(path, "w") as f:
    for prompt, scored in _CPU_LISTS:
      f.write(json.dumps({"prompt": prompt, "responses": [r for r, _ in scored],
                          "scores": [s for _, s in scored]}) + "\n")
  return {"data.path": path}


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
