"""FIRST: SmolLM2-135M-Instruct distilled into a 6-layer student from calibrated teacher targets.

FIRST (Shum et al., *FIRST: Teach A Reliable Large Language Model Through Efficient Trustworthy
Distillation*, EMNLP 2024, arXiv:2408.12168; docs/methods.md §15) transfers only the teacher's
top-5 tokens per position, renormalised, and re-tempers them with the one temperature that makes
them best calibrated on held-out data ("trustworthy maximization"). jkd does this once, when the
offline teacher cache is written (``--k 5 --calibrate``: the temperature of lowest ECE on the
held-out split, which is also cached as the evaluation split); the student (every 5th teacher
layer) then learns the cached targets with the forward KL (``teacher.online=False``, nothing
outside the top 5), and reports its calibration ``eval/student_ece`` beside its accuracy
``eval/student_accuracy``. Write the cache, then train::

  python -m jkd.data.jsonl --input texts.jsonl --root /tmp/jkd_data --name texts \\
      --eval_fraction 0.05
  python -m jkd.data.teacher_cache --teacher smollm2 --dataset /tmp/jkd_data/texts \\
      --seq_len 256 --k 5 --eval_split eval --calibrate --out /tmp/jkd_data --name first_cache
  python -m jkd.train --config configs/first.py --workdir /tmp/jkd_first \\
      --config.data.path=/tmp/jkd_data/first_cache

The cache writer prints the fitted temperature and the teacher's ECE before and after; the run
logs them as ``targets/temperature``, ``targets/teacher_ece``, ``targets/renormalized_ece``,
``targets/calibrated_ece`` and ``targets/topk_coverage`` (and its report lists them).
``--calibration_criterion nll`` fits the temperature by the labels' likelihood instead.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), a calibrated top-5 cache of
16 synthetic sequences fitted on 8 held-out ones (:func:`make_cpu_data`; ``python
configs/first.py /tmp/first_cpu`` writes it and prints the ``--config.data.path=...`` to add),
3 steps.
"""

from jkd.train import recipes

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu",)
#: FIRST's top-k.
K = 5


def get_config(arg=None):
  variant = recipes.check_variant("first", arg)
  c = recipes.smollm2_config({"kd": {"term": "forward_kl", "weight": 1.0}}, source="tfds")
  if variant == "cpu":
    recipes.cpu_variant(c)
  c.teacher.online = False  # The targets come from the calibrated cache (data.path).
  c.data.update(dict(source="tfds", shape="tokenized", path="",
                     seq_len=c.data.seq_len if variant == "cpu" else 256))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The calibrated cache the ``cpu`` variant trains on, written under ``workdir``.

  Returns:
    ``{"data.path": <its directory>}``.
  """
  from jkd.train import recipe_data  # pylint: disable=import-outside-toplevel
  return recipe_data.write_cpu_teacher_cache(get_config(arg), workdir, k=K, name="first_cache",
                                             heldout_examples=8, calibrate=True)


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
