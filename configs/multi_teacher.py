"""Several teachers: each example distilled from the teacher of its domain (routed mixture).

The engine holds several frozen teachers (:mod:`jkd.train.teachers`): teacher 0 is
``teacher.source`` (it also gives the tokenizer and the student's layers), the others are the
model specs of ``teachers.specs``; every example's teacher distribution is their routed mixture,
here routed by the ``domain`` of each example (``teachers.routing=field``), and the student learns
it with forward KL + 0.1 cross-entropy. Default: every 5th layer of teacher 0, 500 steps of
8 x 256 tokens on JSONL files whose lines carry a ``domain`` field (``data.source=domains``, the
domain mixture kept uniform: ``ddk.floor=1``; ``teachers.domains`` lists the domain names in
teacher order); the teachers are yours, e.g. two fine-tunes of one base on code and on maths::

  python -m jkd.train --config configs/multi_teacher.py --workdir /tmp/multi_teacher \\
      --config.teacher.source=hf:/models/code_teacher \\
      --config.teachers.specs=hf:/models/math_teacher \\
      --config.teachers.domains=code,math --config.ddk.path=mixed.jsonl

Other routings: ``--config.teachers.routing=fixed --config.teachers.weights=0.7,0.3`` (one
mixture for every example) or ``--config.teachers.routing=gate`` (a learned gate, MST-Distill's
instance-level router fitted to the mixture's likelihood of the labels). On-policy: add
``--config.onpolicy.mode=gkd`` (the student's samples keep their example's ``domain``).

Variant ``cpu`` (seconds; what ``tests/test_multi_teacher.py`` runs): two tiny teachers of the
CPU teacher's shape, each trained with cross-entropy on one of two synthetic domains (bigram
chains of branching 2 and 3), taught by domain to a random 2-layer student; variant
``cpu_single`` distils the same student, with the same steps and data, from one teacher of the
same size and training steps trained on both domains. ``make_cpu_data`` trains and saves the
three teachers (Hugging Face directories) and returns the overrides; the routed student has the
lower held-out NLL on each domain::

  python -m jkd.train --config configs/multi_teacher.py:cpu --workdir /tmp/multi_teacher_cpu \\
      $(python configs/multi_teacher.py /tmp/multi_teacher_data cpu)
"""

from jkd.train import config
from jkd.train import recipes

#: The variants ``tests/test_multi_teacher.py`` runs end to end (their teachers are trained by
#: ``make_cpu_data``).
CPU_VARIANTS = ("cpu", "cpu_single")
#: Training steps of the CPU variants' teachers.
CPU_TEACHER_STEPS = 150


def get_config(arg=None):
  variant = recipes.check_variant("multi_teacher", arg, CPU_VARIANTS)
  c = recipes.smollm2_config({"kd": {"term": "forward_kl", "weight": 1.0},
                              "ce": {"term": "cross_entropy", "weight": 0.1}},
                             source="domains")
  c.data.update(dict(source="domains", seq_len=256))
  config.add_sections(c, "ddk", "onpolicy")
  c.ddk.update(dict(floor=1.0, eval_fraction=0.05))  # A uniform domain mixture.
  if variant != "cpu_single":
    config.add_sections(c, "teachers")
    c.teachers.update(dict(routing="field", field="domain"))
  c.train.update(dict(steps=500, log_every=10))
  c.eval.update(dict(every=50, batches=0, at_start=False))
  if variant.startswith("cpu"):
    recipes.tiny_teacher(c, lr=1e-2, steps=200)
    c.teacher.source = ""  # make_cpu_data's teachers (HF directories).
    c.student.source = "random"
    c.student.model.num_layers = 2
    c.optimizer.update(dict(warmup_steps=1, weight_decay=0.0))
    c.data.update(dict(num_examples=256, eval_examples=32, seq_len=16, batch_size=16))
    c.ddk.update(dict(num_domains=2))
    c.onpolicy.update(dict(max_new_tokens=8))
    c.train.update(dict(steps=200, log_every=10, progress_bar=False))
    c.eval.update(dict(every=0, batches=0))
    c.checkpoint.update(dict(every=0, keep=1, async_save=False))
  return c


def make_cpu_data(workdir, arg="cpu"):
  """Trains the CPU variants' three tiny teachers under ``workdir`` (reused when there).

  Returns:
    Config overrides: ``cpu``: ``teacher.source`` (the ``d0`` specialist) and
    ``teachers.specs`` (the ``d1`` specialist); ``cpu_single``: ``teacher.source`` (the
    teacher trained on both domains).
  """
  from jkd.train import recipe_data  # noqa: PLC0415
  c = get_config(arg)
  dirs = recipe_data.write_cpu_domain_teachers(c, workdir, steps=CPU_TEACHER_STEPS)
  if arg == "cpu_single":
    return {"teacher.source": f"hf:{dirs['union']}"}
  return {"teacher.source": f"hf:{dirs['d0']}", "teachers.specs": f"hf:{dirs['d1']}"}


if __name__ == "__main__":
  import sys
  print(" ".join(f"--config.{k}={v}" for k, v in
                 make_cpu_data(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu").items()))
