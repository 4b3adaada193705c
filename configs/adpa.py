"""ADPA: advantage-guided distillation of a DPO-aligned teacher into a student (issue 7).

``NLL(chosen) + 1.6 * token-mean[-sum_{a in top-50} q_student(a|s) (log pi_teacher(a|s) -
log pi_teacher_ref(a|s))]`` over the completions of each pair (term ``adpa``,
:func:`jkd.losses.adpa_advantage_loss`). The advantage needs two teachers, the aligned one and
its reference (the model before alignment), so their top-k is computed once, offline, and
stored with the pairs (:func:`jkd.train.preference_step.pair_teacher_targets`); the step reads
it from the batch (``data.source="pairs"``, an ``.npz``) and runs no teacher. With SmolLM2:
aligned = SmolLM2-135M-Instruct, reference = its SFT checkpoint (a Hugging Face directory)::

  python -c "import configs.adpa as a; a.write_pairs('pairs.jsonl', 'hf:/path/to/sft', 'adpa.npz')"
  python -m jkd.train --config configs/adpa.py --workdir /tmp/adpa --config.data.path=adpa.npz

Variant ``cpu``: random tiny models (vocabulary 128, width 32) for the student, the aligned
teacher and its reference, random token pairs, 4 steps (seconds; what CI runs).
:func:`make_cpu_data` writes its ``.npz`` and returns the override (``python configs/adpa.py
DIR`` prints it)::

  python -m jkd.train --config configs/adpa.py:cpu --workdir /tmp/adpa_cpu \\
      --config.data.path=DIR/adpa_cpu.npz
"""

import json
import os

from jkd.train import recipes

#: The variants CI runs end to end.
CPU_VARIANTS = ("cpu",)
_TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
             num_kv_heads=2, max_position_embeddings=64)


def get_config(arg=None):
  variant = recipes.check_variant("adpa", arg)
  c = recipes.smollm2_config({"adpa": {"term": "adpa", "weight": 1.0, "k": 50, "kd_weight": 1.6}},
                              source="pairs")
  c.optimizer.update(dict(lr=5e-5, warmup_steps=10))
  c.data.update(dict(source="pairs", seq_len=256))
  c.eval.update(dict(every=0, at_start=False))
  if variant == "cpu":
    recipes.tiny_teacher(c)
    c.objective.adpa.k = 8
    c.data.update(dict(num_examples=16, seq_len=16, batch_size=4))
  return c


def _save(path, pairs, targets):
  import numpy as np  # noqa: PLC0415
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **pairs, **targets)
  return path


def write_pairs(pairs_jsonl, reference_spec, out, *, teacher_spec="smollm2", k=50, seq_len=256):
  """Tokenizes text pairs and stores them with the aligned teacher's top-``k`` and the
  reference's log-probs there (``teacher_spec``/``reference_spec``: ``smollm2``, ``gguf:PATH``,
  ``hf:DIR``, ``random:{json}``). Returns ``out``."""
  from jkd.data import corpus, model_spec, preference  # noqa: PLC0415
  from jkd.train import preference_step  # noqa: PLC0415
  teacher = model_spec.load_model(teacher_spec)
  reference = model_spec.load_model(reference_spec)
  pairs = preference.tokenize_pairs(corpus.read_prompts(pairs_jsonl, keep=True), teacher.tokenizer,
                                    seq_len=seq_len, source=pairs_jsonl)
  pairs.pop("example_index")
  targets = preference_step.pair_teacher_targets(
      pairs, teacher=(teacher.params, teacher.config),
      reference=(reference.params, reference.config), k=k)
  return _save(out, pairs, targets)


def make_cpu_data(workdir, arg="cpu"):
  """Writes the cpu variant's pairs with random aligned/reference teachers under ``workdir``.

  Returns:
    ``{"data.path": the .npz}``.
  """
  from jkd.data import model_spec  # noqa: PLC0415
  from jkd.train import preference_step  # noqa: PLC0415
  from jkd.data import synthetic_pair_examples  # noqa: PLC0415
  c = get_config(arg)
  pairs = synthetic_pair_examples(int(c.data.num_examples), int(c.data.seq_len),
                                  _TINY["vocab_size"], seed=0)
  aligned, reference = (model_spec.load_model("random:" + json.dumps({**_TINY, "seed": s}))
                        for s in (1, 2))
  targets = preference_step.pair_teacher_targets(
      pairs, teacher=(aligned.params, aligned.config),
      reference=(reference.params, reference.config), k=int(c.objective.adpa.k))
  return {"data.path": _save(os.path.join(workdir, "adpa_cpu.npz"), pairs, targets)}


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
