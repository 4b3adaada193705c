"""Helpers of the ``configs/`` recipes: their CPU-sized variants and the tiny data those need.

Every recipe in ``configs/`` has a ``cpu`` variant that CI runs end to end in seconds: a random
4-layer teacher of vocabulary 128 and width 32 (:func:`cpu_variant`), short synthetic sequences
and a few steps. Variants that read data from disk (an offline teacher cache) get it from
:func:`jkd.train.recipe_data.write_cpu_teacher_cache`, called by the config module's
``make_cpu_data(workdir, arg)``. This module imports no engine code: config files import it.
"""

from __future__ import annotations

from typing import Any

from jkd.train.config import add_sections, default_config

#: The random teacher of the CPU variants (``teacher.model`` fields).
CPU_TEACHER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=4,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def cpu_variant(c, *, steps: int = 3, seq_len: int = 16, batch_size: int = 4):
  """Makes a recipe's config CPU-sized, in place: a random teacher (:data:`CPU_TEACHER`) with
  a character tokenizer, a student of every 2nd teacher layer (a ``random`` student keeps its
  own ``student.model``), ``steps`` steps on ``synthetic`` data of ``batch_size`` x ``seq_len``
  tokens, an evaluation (one batch) and a checkpoint at the end only.

  Args:
    c: a config from :func:`jkd.train.default_config` (changed in place).
    steps, seq_len, batch_size: the run's size.

  Returns:
    ``c``.

  >>> from jkd.train import default_config
  >>> c = cpu_variant(default_config())
  >>> c.teacher.source, c.student.every, c.train.steps, c.data.seq_len
  ('random', 2, 3, 16)
  """
  c.teacher.source = "random"
  c.teacher.path = ""
  c.teacher.model.update(CPU_TEACHER)
  c.teacher.tokenizer = "char"
  if c.student.source == "layers":
    c.student.every = 2
  c.optimizer.update(dict(lr=1e-3, warmup_steps=1, weight_decay=0.0))
  c.data.update(dict(source="synthetic", path="", num_examples=8 * batch_size,
                     eval_examples=batch_size, seq_len=seq_len, batch_size=batch_size))
  if "corpus" in c:
    c.corpus.update(dict(limit=8, max_new_tokens=8, batch_size=4))
  if "onpolicy" in c:
    c.onpolicy.update(dict(max_new_tokens=8))
  c.train.update(dict(steps=steps, log_every=1, peak_tflops_per_device=1.0,
                      progress_bar=False))
  c.eval.update(dict(every=0, batches=1, at_start=False))
  c.checkpoint.update(dict(every=0, keep=1, async_save=False))
  c.report.update(dict(samples=1, sample_tokens=8))
  return c


def tiny_teacher(c, *, steps: int = 4, lr: float = 1e-3, max_position_embeddings: int = 64,
                 char_tokenizer: bool = False):
  """Makes a recipe CPU-sized in place but keeps its own data source (unlike
  :func:`cpu_variant`): the random teacher of :data:`CPU_TEACHER` (``max_position_embeddings``
  positions; a character tokenizer with ``char_tokenizer``), a student of every 2nd teacher
  layer, ``lr`` after one warmup step, ``steps`` steps logged each, checkpoints every 2.

  >>> from jkd.train import default_config
  >>> c = tiny_teacher(default_config()); c.teacher.model.hidden_size, c.train.steps
  (32, 4)
  """
  c.teacher.source = "random"
  c.teacher.model.update({**CPU_TEACHER, "max_position_embeddings": max_position_embeddings})
  if char_tokenizer:
    c.teacher.tokenizer = "char"
  c.student.every = 2
  c.optimizer.update(dict(lr=lr, warmup_steps=1))
  c.train.update(dict(steps=steps, log_every=1))
  c.checkpoint.update(dict(every=2, keep=2))
  return c


def smollm2_config(objective: dict[str, Any], *, source: str = "teacher_corpus"):
  """The base of the SmolLM2 recipes: SmolLM2-135M-Instruct teaching every 5th of its layers
  with ``objective`` on a teacher-written corpus (200 steps of 8 x 160 tokens, evaluation and
  checkpoints every 50). Recipes start from it and change what differs; one on other data names
  its ``source`` (``data.source``: the ``corpus`` section comes only with ``teacher_corpus``)."""
  c = default_config()
  c.teacher.source = "smollm2"
  c.student.source = "layers"
  c.student.every = 5
  c.objective = objective
  c.optimizer.update(dict(lr=5e-4, warmup_steps=20, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source=source, seq_len=160, batch_size=8))
  if source == "teacher_corpus":
    add_sections(c, "corpus").corpus.update(dict(max_new_tokens=64, batch_size=16))
  c.train.update(dict(steps=200, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=50, at_start=True))
  c.checkpoint.update(dict(every=50, keep=2))
  return c


def token_kd_config(name: str, objective: dict[str, Any], arg: str | None = None):
  """The config of a token-level distillation recipe (``configs/kd_forward.py``,
  ``configs/kd_gjsd.py``): SmolLM2-135M-Instruct teaching every 5th of its layers on a
  teacher-written corpus with ``objective``, and its variants ``cache`` (from an offline teacher
  cache, ``teacher.online=False``: the divergence reads ``teacher_topk_*`` from the batch),
  ``cpu`` and ``cpu_cache`` (:func:`cpu_variant`).

  Args:
    name: the recipe's name (for the unknown-variant error).
    objective: the :func:`jkd.losses.build_objective` spec.
    arg: the variant (None: the real run).
  """
  c = smollm2_config(objective)
  variant = check_variant(name, arg, ("cache", "cpu", "cpu_cache"))
  if variant.startswith("cpu"):
    cpu_variant(c)
  if variant.endswith("cache"):
    c.teacher.online = False
    c.data.update(dict(source="tfds", shape="tokenized", path="",
                       seq_len=c.data.seq_len if variant == "cpu_cache" else 256))
    c.eval.at_start = False
  return c


def check_variant(name: str, arg: str | None, variants: tuple[str, ...] = ("cpu",)) -> str:
  """The variant ``arg`` of recipe ``name`` (``""`` for the real run), or a clear error.

  >>> check_variant("dpo", None), check_variant("dpo", "cpu")
  ('', 'cpu')
  """
  variant = arg or ""
  if variant and variant not in variants:
    names = ", ".join(repr(v) for v in variants)
    raise ValueError(f"unknown variant {arg!r} of {name}; use no arg or {names}.")
  return variant


def preference_config(name: str, objective: dict[str, Any], arg: str | None = None, *,
                      online: bool = True, every: int = 1, lr: float = 1e-6,
                      shape: str = "", cpu_every: int | None = None):
  """The base of the preference recipes (``configs/dpo.py``, ``simpo.py``, ``orpo.py``,
  ``kto.py``, ``dpo_teacher_ref.py``): a policy made of SmolLM2-135M-Instruct's layers
  (``every=1``: a copy of it) trained on text pairs (``data.source=preference``, ``data.path``)
  with ``objective``, 500 steps of 8 pairs of 512 tokens, no evaluation set (``eval.every=0``;
  the objective's metrics are logged every step), checkpoints every 100 steps.

  Data: ``data.source=preference`` reads ``data.path``, JSONL files of ``{"prompt", "chosen",
  "rejected"}`` text (built once into a TFDS dataset under ``data.cache_dir``) or a TFDS
  preference dataset directory (e.g. from ``python -m jkd.data.preference make``); prompts go
  through the chat template, labels cover the completions only.

  Variant ``cpu``: :func:`cpu_variant` (a random 4-layer teacher of vocabulary 128 and width
  32, 3 steps in seconds) on random token pairs (``data.source=synthetic_pairs``) of 32 tokens.

  Args:
    name: the recipe's name (for the unknown-variant error).
    objective: the :func:`jkd.losses.build_objective` spec.
    arg: the variant (None: the real run; ``"cpu"``).
    online: whether the teacher runs in the step (as the reference or a teacher); False: it
      only initialises the policy.
    every: the policy is every ``every``-th teacher layer; ``cpu_every`` in the CPU variant
      (default ``every``).
    lr: peak learning rate.
    shape: ``data.shape`` (``"unpaired"``: KTO rows).
  """
  variant = check_variant(name, arg)
  c = default_config()
  c.teacher.source = "smollm2"
  c.teacher.online = online
  c.student.source = "layers"
  c.student.every = every
  c.objective = objective
  c.optimizer.update(dict(lr=lr, warmup_steps=10, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="preference", path="", shape=shape, seq_len=512, batch_size=8))
  c.train.update(dict(steps=500, log_every=5, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(every=100, keep=2))
  if variant == "cpu":
    cpu_variant(c, seq_len=32)
    c.student.every = every if cpu_every is None else cpu_every
    c.data.update(dict(source="synthetic_pairs", shape=shape))
  return c


def apply_overrides(c, overrides: dict[str, Any]):
  """Sets dotted keys (``{"data.path": ...}``) of a config in place; returns it.

  >>> from jkd.train import default_config
  >>> apply_overrides(default_config(), {"data.seq_len": 8}).data.seq_len
  8
  """
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ---------------------------------------------------------------------------------------------
# Pod-scale recipes: real model shapes, planned for TPU slices (``python -m jkd.plan``).

#: Published shapes (the models' Hugging Face ``config.json``) of the pod recipes' models, as
#: ``teacher.model`` fields. Students are ``student.model`` overrides of their teacher's shape.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_embeddings=False,
        max_position_embeddings=131072),
    "llama-3.1-70b": dict(
        architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_embeddings=False,
        max_position_embeddings=131072),
    "llama-3.2-1b": dict(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5, tie_embeddings=True,
        max_position_embeddings=131072),
    "qwen3-8b": dict(
        architecture="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=False, qk_norm=True, max_position_embeddings=40960),
    "qwen3-1.7b": dict(
        architecture="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True, max_position_embeddings=40960),
    "qwen3-0.6b": dict(
        architecture="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_embeddings=True, qk_norm=True, max_position_embeddings=40960),
}


def pod_config(c, *, teacher: str, student: str, mesh: tuple[int, int, int],
               batch_size: int, seq_len: int):
  """Makes ``c`` a pod-scale run, in place: a ``random`` teacher of shape ``SHAPES[teacher]``
  in bfloat16 (a plan reads shapes only; the real run sets ``teacher.source=hf:DIR``), a
  ``random`` student of shape ``SHAPES[student]`` (float32 master weights, bfloat16 compute,
  rematerialised, scanned layers), ``mesh`` and a global batch of ``batch_size x seq_len``.
  The teacher's tokenizer is its own (``teacher.tokenizer=""``), for the real run's data.

  >>> from jkd.train import default_config
  >>> c = pod_config(default_config(), teacher="llama-3.1-8b", student="llama-3.2-1b",
  ...                mesh=(1, 16, 1), batch_size=16, seq_len=2048)
  >>> c.student.model.hidden_size, c.teacher.param_dtype, tuple(c.mesh.shape)
  (2048, 'bfloat16', (1, 16, 1))
  """
  c.teacher.source = "random"
  c.teacher.path = ""
  c.teacher.model.update(SHAPES[teacher])
  c.teacher.update(dict(dtype="bfloat16", param_dtype="bfloat16", tokenizer=""))
  c.student.source = "random"
  c.student.model.update({k: v for k, v in SHAPES[student].items() if k != "architecture"})
  c.student.update(dict(dtype="bfloat16", remat=True, unroll_layers=False))
  c.data.update(dict(seq_len=seq_len, batch_size=batch_size))
  c.mesh.shape = tuple(mesh)
  return c


def pod_cpu_variant(c, **kwargs):
  """The CPU variant of a pod recipe, in place: :func:`cpu_variant` with the student back to
  every 2nd layer of the CPU teacher (its pod shape overrides cleared), float32, one device."""
  cpu_variant(c, **kwargs)
  c.student.source = "layers"
  c.student.every = 2
  for key in list(c.student.model.keys()):
    c.student.model[key] = None
  c.teacher.tokenizer = "char"
  c.teacher.update(dict(dtype="float32", param_dtype="float32"))
  c.student.update(dict(dtype="float32", remat=False, unroll_layers=True))
  c.mesh.shape = (-1, 1, 1)
  return c
