"""Swing: SmolLM2-135M-Instruct distilled into a 6-layer student from private teacher targets.

Swing distillation (Li et al., *Swing Distillation: A Privacy-Preserving Knowledge Distillation
Framework*, arXiv:2212.08349; docs/methods.md §16) injects noise into the soft targets so that
what the teacher knows does not flow unshielded into the student. jkd releases the targets once,
when the offline teacher cache is written, by the Gaussian mechanism: at every position the
teacher's full next-token distribution is clipped to L2 norm ``--privacy_clip`` and noised with
the ``sigma`` that makes all positions of one training sequence together
``(epsilon, delta)``-differentially private (analytic Gaussian mechanism), and the top 32 of the
noisy vector are renormalised and cached. The student (every 5th teacher layer) learns them with
the forward KL plus 0.5 cross-entropy on the (public) labels, the teacher offline::

  python -m jkd.data.jsonl --input texts.jsonl --root /tmp/jkd_data --name texts \\
      --eval_fraction 0.05
  python -m jkd.data.teacher_cache --teacher smollm2 --dataset /tmp/jkd_data/texts \\
      --seq_len 256 --k 32 --eval_split eval --privacy_epsilon 8 --privacy_delta 1e-5 \\
      --privacy_clip 1 --out /tmp/jkd_data --name swing_cache
  python -m jkd.train --config configs/swing.py --workdir /tmp/jkd_swing \\
      --config.data.path=/tmp/jkd_data/swing_cache

The cache writer prints the privacy cost; the run logs it as ``privacy/epsilon``,
``privacy/delta``, ``privacy/sigma``, ``privacy/clip``, ``privacy/epsilon_position`` and
``privacy/epsilon_sequence`` (and its report lists them). What is protected, and what it costs
in utility (at ``epsilon=8`` over 256 positions ``sigma`` is about 13.6 per vocabulary entry, far
above any probability), is spelled out in docs/methods.md §16.

Variant ``cpu``: a random 4-layer teacher (vocabulary 128, width 32), a private top-16 cache of
16 synthetic sequences at ``(8, 1e-5)`` per sequence with a fixed noise seed (CI only: a known
seed removes the noise; :func:`make_cpu_data`, ``python configs/swing.py /tmp/swing_cpu``
writes it and prints the ``--config.data.path=...`` to add), 3 steps.
"""

from jkd.train import recipes

#: The variants CI runs end to end (tests/test_configs.py).
CPU_VARIANTS = ("cpu",)
#: The guarantee of the ``cpu`` variant's cache (the real run's is on the cache's command line).
CPU_PRIVACY = dict(epsilon=8.0, delta=1e-5, clip=1.0, seed=0)


def get_config(arg=None):
  variant = recipes.check_variant("swing", arg)
  c = recipes.smollm2_config({"kd": {"term": "forward_kl", "weight": 1.0},
                              "ce": {"term": "cross_entropy", "weight": 0.5}}, source="tfds")
  if variant == "cpu":
    recipes.cpu_variant(c)
  c.teacher.online = False  # The targets come from the private cache (data.path).
  c.data.update(dict(source="tfds", shape="tokenized", path="",
                     seq_len=c.data.seq_len if variant == "cpu" else 256))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """The private cache the ``cpu`` variant trains on, written under ``workdir``.

  Returns:
    ``{"data.path": <its directory>}``.
  """
  from jkd.data.privacy import PrivacySpec  # pylint: disable=import-outside-toplevel
  from jkd.train import recipe_data  # pylint: disable=import-outside-toplevel
  return recipe_data.write_cpu_teacher_cache(get_config(arg), workdir, k=16, name="swing_cache",
                                             heldout_examples=8,
                                             privacy=PrivacySpec(**CPU_PRIVACY))


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in make_cpu_data(sys.argv[1]).items()))
