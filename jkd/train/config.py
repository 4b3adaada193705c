"""The training config: every key the engine reads, with its default (configs/ start from it).

Experiment configs (``configs/<name>.py``) call :func:`default_config` and change what they
need; the command line overrides any key (``--config.optimizer.lr=3e-4``) and, with the config
locked, a misspelt key is an error that names the nearest keys. The sections ``corpus``,
``onpolicy``, ``rounds`` and ``ddk`` are optional: a recipe that uses one adds it
(:func:`add_sections`), so a resolved config holds only what its run reads, and a reader that
finds its section missing names it (:func:`section`).

Keys:

``seed``                   init of random models; the per-step key is ``fold_in(seed key, step)``
``teacher.source``         ``random`` (``teacher.model``), ``hf`` (``path``: a Hugging Face
                           directory), ``gguf`` (``path``: a ``.gguf`` file), ``smollm2``
                           (the packaged SmolLM2-135M-Instruct GGUF), or a model spec
                           (:mod:`jkd.data.model_spec`: ``gguf:PATH``, ``hf:DIR``)
``teacher.model.*``        :class:`jkd.models.ModelConfig` fields of a ``random`` teacher
                           (shapes, ``rope_theta``, ``rope_scaling`` (Llama 3: ``(factor,
                           low, high, original_max_position_embeddings)``), ``tie_embeddings``,
                           ``qkv_bias``, ``qk_norm``, ``max_position_embeddings``)
``teacher.dtype``          compute dtype; ``teacher.param_dtype``: ``bfloat16`` stores the frozen
                           teacher in bf16
``teacher.tokenizer``      ``""``: the teacher's own (GGUF or Hugging Face); ``char``: a
                           character-level tokenizer of the vocabulary size (random teachers)
``teacher.online``         True: the frozen teacher runs inside every step. False: its
                           parameters are not kept for training (read only when a ``layers``
                           student is initialised from them); every distillation term then
                           reads a sparse teacher from the batch (an offline teacher cache:
                           ``teacher_topk_ids``, ``teacher_topk_logprobs``,
                           ``teacher_tail_logprob``), preference terms a precomputed reference,
                           and evaluation reports student metrics only
``student.source``         ``layers`` (every ``student.every``-th teacher layer), ``random``
                           (the teacher's config with ``student.model.*`` overrides: shapes,
                           ``rope_theta``, ``rope_scaling``, ``tie_embeddings``, ``qkv_bias``,
                           ``qk_norm``, ``max_position_embeddings``, ``rms_norm_eps``),
                           ``hf`` or ``checkpoint`` (``student.path``), or ``prune`` (the
                           teacher pruned by its measured importance, :mod:`jkd.students`)
``student.prune.*``        ``num_layers``, ``intermediate_size``, ``num_heads``,
                           ``hidden_size``: the pruned student's sizes (0: the teacher's);
                           ``layers_by``: ``removal`` (calibration NLL without the layer) or
                           ``influence`` (block influence); ``calibration_batches``: how many
                           of the first training batches the importance is measured on
``student.model.num_experts``  a mixture-of-experts student (``random`` source): experts per
                           layer, ``num_experts_per_tok`` routed per token,
                           ``router_aux_loss_coef`` the load-balancing loss weight
``student.init_from``      a Hugging Face directory or a jkd workdir/checkpoint: overrides
                           ``student.source`` (also ``--init_from`` on the command line)
``student.dtype``          compute dtype; ``student.remat``: rematerialise layers
``student.unroll_layers``  run the student's layers as straight-line code rather than a
                           scan (default True: faster steps for small students, e.g. 18% on
                           the CPU benchmark's 6-layer student's forward + backward; a
                           longer compile, which grows with the layer count)
``objective``              :func:`jkd.losses.build_objective` spec
``optimizer.*``            :func:`jkd.train.make_optimizer` keys
``data.source``            ``teacher_corpus`` (the teacher answers ``corpus.prompts``; see
                           :mod:`jkd.train.stages`), ``synthetic`` (``num_examples``, ``eval_examples``), ``npz``
                           (``path``, ``eval_path``: ``.npz`` files of ``tokens``, ``labels``
                           and optionally ``loss_mask`` ``[N, T]`` arrays), ``jsonl``
                           (``path``, optional ``eval_path``: JSONL files or globs, several
                           comma-separated; built once into a TFDS dataset under ``cache_dir``
                           keyed by a hash of their contents; see :mod:`jkd.data.jsonl`) or
                           ``tfds`` (``path`` of a TFDS dataset directory, or ``name`` under
                           ``data_dir``; ``split``, ``eval_split``). ``jsonl``/``tfds`` are
                           tokenised with the teacher's tokenizer (:func:`jkd.train.build.tokenizer_for`;
                           not a ``random`` teacher) by :class:`jkd.data.DataPipeline`.
                           Preference pairs: ``preference`` (``path``: JSONL files of
                           ``{"prompt", "chosen", "rejected"}`` text, built like ``jsonl``, or a
                           TFDS preference dataset directory such as
                           :func:`jkd.data.write_pairs` writes; tokenised with
                           :func:`jkd.data.tokenize_preference`; no eval source) or
                           ``synthetic_pairs`` (``num_examples`` random token pairs: prompts,
                           chosen and rejected completions of random ids; for CPU smoke runs)
``data.seq_len``, ``data.batch_size`` (global), ``data.seed`` (shuffling)
``data.shape``             ``""`` (the dataset's own: ``text``, ``prompt_completion``, ``chat``,
                           or ``tokenized`` for token arrays such as an offline teacher cache;
                           ``unpaired`` with ``preference``/``synthetic_pairs``: KTO batches, the
                           chosen completion of each pair desirable, the rejected one not)
``data.pack``              pack documents into rows (``segment_ids``/``positions``, no attention
                           across documents) instead of padding each one
``data.overflow``          an example longer than ``seq_len``: ``truncate`` (counted) or
                           ``error``; empty text/completion lines are an error at import
``data.chat_template``     prompt/completion through the tokenizer's chat template (loss on the
                           completion / assistant turns only)
``data.split``, ``data.eval_split``  splits of ``tfds``/``jsonl`` data (``eval_split`` ``""``:
                           ``eval`` when the dataset has it, else no evaluation)
``data.eval_fraction``     ``jsonl``: move this fraction of the lines to the ``eval`` split
``data.name``, ``data.data_dir``  a ``tfds`` dataset by name; ``data.cache_dir``: where ``jsonl``
                           datasets are built (default ``~/.cache/jkd/datasets``)
``train.steps``, ``train.grad_accum``, ``train.log_every``
``train.max_nan_steps``    stop after this many non-finite (skipped) steps in a row
``train.peak_tflops_per_device``  for MFU (``perf/mfu``): 989 is an H100's dense bf16 peak
``train.progress_bar``     tqdm bar on process 0
``eval.every``             steps between evaluations (0: only at the end); ``eval.batches``:
                           at most this many eval batches (0: all); ``eval.at_start``: also
                           evaluate the initial student (step 0) in a fresh run
``corpus.*``               ``data.source=teacher_corpus``: ``prompts`` (a JSONL file; ``""``:
                           the shipped instruction set), ``holdout_every`` (prompts whose id
                           number is a multiple of it are held out for evaluation), ``limit``
                           (at most this many train prompts; 0: all), ``max_new_tokens``,
                           ``batch_size``, ``temperature``, ``top_p``, ``seed`` of the teacher's
                           sampling
``report.*``               ``enabled``: write ``report.md``/``report.json``/``curves.png`` in
                           the workdir (:mod:`jkd.train.report`) with ``samples`` greedy samples
                           of ``sample_tokens`` tokens on held-out prompts; ``title``
``onpolicy.mode``          ``""`` (off), ``gkd`` (GKD: with probability ``lmbda`` a batch's
                           completions are the student's samples) or ``distillm`` (DistiLLM:
                           a share ``p`` of each batch's rows are student samples, replayed
                           from a buffer of ``buffer_size`` or, with probability ``lmbda``,
                           fresh; ``p`` grows by ``p_step`` when ``metric`` does not improve
                           between evaluations); see :mod:`jkd.train.sources.onpolicy`
``onpolicy.*``             sampling: ``temperature``, ``top_p``, ``max_new_tokens``,
                           ``eos_id`` (-1: none), ``pad_id``
``data.select``            ``""`` (all training examples) or ``miniplm`` (MiniPLM difference
                           sampling: keep the ``select_fraction`` (0.5) of the examples with the
                           highest ``avg log p_teacher - avg log p_reference``, the reference a
                           small model of the same tokenizer, ``select_reference``: ``smollm2``,
                           ``gguf:PATH``, ``hf:DIR`` or ``random:{json}``; in-memory data only:
                           ``synthetic``/``npz``; see :mod:`jkd.train.sources.miniplm`)
``data.source=pairs``      tokenized pairs from an ``.npz`` (``path``), with any extra per-pair
                           arrays such as the teacher targets of
                           :func:`jkd.train.preference_step.pair_teacher_targets` (ADPA)
``data.source=step_pairs``  Step-DPO (:mod:`jkd.data.ranked`): ``path``, JSONL files of
                           ``{"prompt", "prefix", "chosen_step", "rejected_step"}`` (pairs whose
                           context is the prompt and the prefix, labels on the step);
                           ``ranked``: JSONL files of ``{"prompt", "responses", "scores"}`` (TPO
                           list batches, ``K`` = the longest list); ``synthetic_ranked``:
                           ``num_examples`` random lists
``data.source=rounds``     Distillation-DPO (:mod:`jkd.train.sources.rounds`): every
                           ``rounds.steps_per_round`` steps the student samples ``rounds.n``
                           completions (``max_new_tokens``, ``temperature``, ``top_p``; sampled
                           ``generate_batch_size`` at a time) for each prompt of ``rounds.prompts``
                           (a JSONL file; ``""``: the shipped instructions; at most ``limit``,
                           0: all), the teacher ranks them by mean log-likelihood, and the
                           round's batches are its best/worst pairs (``data.seq_len``,
                           ``data.batch_size``, ``data.chat_template``); no eval source
``data.source=domains``    DDK (:mod:`jkd.train.sources.ddk`): a mixture of per-domain sources
                           whose weights follow the smoothed per-domain student-teacher eval
                           NLL gap (``ddk.alpha`` smoothing, ``ddk.floor`` uniform share),
                           updated at every evaluation and logged as ``ddk/weight/<domain>``.
                           Domains: ``ddk.path`` (JSONL files whose lines have a ``domain``
                           field; ``ddk.eval_fraction`` of each domain is its eval set) or, when
                           empty, ``ddk.num_domains`` synthetic bigram chains
                           (``data.num_examples``/``eval_examples`` each); every example carries
                           its domain's index as ``domain`` (``teachers.domains`` order if set)
``teachers.*``             several teachers (:mod:`jkd.train.teachers`): teacher 0 is the
                           ``teacher`` section, ``specs`` the later ones (comma-separated model
                           specs), ``dtypes``/``param_dtypes`` theirs (``""``: the teacher's);
                           ``routing`` ``field`` (each example's teacher from the int batch
                           field ``field``, default ``domain``), ``fixed`` (``weights``) or
                           ``gate`` (a learned gate, ``balance`` its load-balancing weight);
                           ``domains``: domain names in teacher order (``data.source=domains``)
``data.source=self_imitation``  Symbolic KD / I2D2 (:mod:`jkd.train.sources.self_imitation`):
                           each ``self_imitation.steps_per_round`` steps a round's data is made:
                           the teacher (round 0) or the student (later rounds) samples ``n``
                           completions per prompt, the ``critic`` (``critic_options``; see
                           :mod:`jkd.data.critics`) scores them and the top ``keep_fraction``
                           scoring at least ``threshold`` (``-inf``: none) are kept; logged per
                           round as ``self_imitation/keep_rate``, ``score_all``, ``score_kept``
``data.source=qcrd``       QCRD (:mod:`jkd.train.sources.qcrd`): the teacher's ``qcrd.positives``
                           rationales (``teacher_temperature``, self-consistency on
                           ``answer_pattern``) paired with ``qcrd.negatives`` samples of the
                           current student per round (``negative_temperature``)
``data.source=arte_corpus``  ARTE (:mod:`jkd.train.sources.arte`): before training the teacher
                           drafts ``arte.n`` answers (``temperature``) to ``arte.prompts``
                           training prompts (0: all), the initial student scores each by the drop
                           in its NLL on ``arte.validation`` after ``lookahead_steps`` SGD steps
                           of ``lookahead_lr`` on it, the best/worst of each prompt DPO-tune a
                           copy of the teacher (``beta``, ``dpo_steps``, ``dpo_lr``,
                           ``dpo_batch_size``), and the tuned teacher writes the corpus (the
                           ``corpus`` section's prompts and sampling); ``arte.eval``: the eval
                           set; ``tune=False``: the untuned teacher writes it
``checkpoint.every``       steps between checkpoints (0: only at the end and on SIGTERM);
                           ``keep``: newest to keep; ``best_metric``/``best_mode``: also keep the
                           best by an eval metric (e.g. ``eval/kl_forward``, ``min``);
                           ``async_save``
``mesh.shape``             ``(data, fsdp, tensor)``; one ``-1`` takes the remaining devices
``distributed.*``          timeouts (seconds) of ``jax.distributed.initialize``, used when
                           ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
                           ``JAX_PROCESS_ID`` are set; a peer silent for ``heartbeat_timeout_s``
                           makes the others exit with one ``error:`` line, exit code 6
                           (:mod:`jkd.train.distributed`)
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


#: Sections that only the recipes using them carry (:func:`add_sections`), with their defaults:
#: the teacher-written corpus, on-policy sampling, Distillation-DPO rounds, DDK's domains.
OPTIONAL_SECTIONS: dict[str, dict] = {
    "corpus": dict(prompts="", holdout_every=10, limit=0, max_new_tokens=64, batch_size=8,
                   temperature=0.7, top_p=0.95, seed=0),
    "onpolicy": dict(mode="", lmbda=0.5, temperature=0.9, max_new_tokens=128, top_p=1.0,
                     eos_id=-1, pad_id=0, buffer_size=1000, p_step=0.1,
                     metric="eval/kl_forward"),
    "rounds": dict(steps_per_round=50, n=4, max_new_tokens=64, temperature=1.0, top_p=1.0,
                   prompts="", limit=0, generate_batch_size=8),
    "ddk": dict(num_domains=3, path="", eval_fraction=0.1, alpha=0.5, floor=0.1),
    # Several teachers (jkd.train.teachers): specs of teachers 1.. (teacher 0: teacher.source).
    "teachers": dict(specs="", dtypes="", param_dtypes="", routing="field", field="domain",
                     weights="", balance=0.0, domains=""),
    # data.source=arte_corpus (jkd.train.sources.arte), with the corpus section.
    "arte": dict(tune=True, prompts=0, n=4, temperature=1.0, validation="", eval="",
                 lookahead_lr=1e-3, lookahead_steps=1, score_batch_size=4, min_gap=0.0,
                 beta=0.1, dpo_steps=50, dpo_lr=1e-6, dpo_batch_size=8),
    # data.source=self_imitation (jkd.train.sources.self_imitation); threshold -inf: none.
    "self_imitation": dict(steps_per_round=50, n=4, keep_fraction=0.5, threshold=float("-inf"),
                           critic="teacher_logprob", critic_options={}, max_new_tokens=64,
                           temperature=1.0, top_p=1.0, prompts="", limit=0,
                           generate_batch_size=8),
    # data.source=qcrd (jkd.train.sources.qcrd).
    "qcrd": dict(steps_per_round=50, positives=4, negatives=2, teacher_temperature=0.7,
                 negative_temperature=1.5, max_new_tokens=64, top_p=1.0, answer_pattern="",
                 prompts="", limit=0, generate_batch_size=8),
}


def add_sections(c: ml_collections.ConfigDict, *names: str) -> ml_collections.ConfigDict:
  """Adds optional sections (:data:`OPTIONAL_SECTIONS`) with their defaults, in place; a section
  already there is kept. Returns ``c``.

  >>> c = add_sections(default_config(), "rounds")
  >>> "rounds" in c, "ddk" in c, c.rounds.n
  (True, False, 4)
  """
  for name in names:
    if name not in OPTIONAL_SECTIONS:
      raise ValueError(f"unknown optional config section {name!r}; choose from"
                       f" {sorted(OPTIONAL_SECTIONS)}.")
    if name not in c:
      c[name] = ml_collections.ConfigDict(dict(OPTIONAL_SECTIONS[name]))
  return c


def section(cfg, name: str, *, needed_by: str):
  """``cfg[name]``, or an error naming what needs the optional section and how to add it."""
  if name not in cfg:
    raise ValueError(f"{needed_by} needs the config section {name!r}, which this config lacks:"
                     f" add it in the config file with jkd.train.config.add_sections(c, {name!r})"
                     " (the recipes that use it do).")
  return cfg[name]


def default_config() -> ml_collections.ConfigDict:
  """Every key of a training config with its default (a SmolLM2-135M teacher), without the
  optional sections (:func:`add_sections`)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.teacher = ml_collections.ConfigDict()
  c.teacher.source = "smollm2"
  c.teacher.path = ""
  c.teacher.model = ml_collections.ConfigDict(dict(
      architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=config_dict.placeholder(int),
      rope_theta=10000.0, rope_scaling=config_dict.placeholder(tuple), rms_norm_eps=1e-5,
      tie_embeddings=True, qkv_bias=False, qk_norm=False, max_position_embeddings=8192))
  c.teacher.dtype = "float32"
  c.teacher.param_dtype = "float32"
  c.teacher.tokenizer = ""
  c.teacher.online = True

  c.student = ml_collections.ConfigDict()
  c.student.source = "layers"
  c.student.every = 2
  c.student.path = ""
  c.student.init_from = ""
  c.student.prune = ml_collections.ConfigDict(dict(
      num_layers=0, intermediate_size=0, num_heads=0, hidden_size=0, layers_by="removal",
      calibration_batches=2))
  c.student.model = ml_collections.ConfigDict(dict(
      vocab_size=config_dict.placeholder(int), num_layers=config_dict.placeholder(int),
      hidden_size=config_dict.placeholder(int),
      intermediate_size=config_dict.placeholder(int), num_heads=config_dict.placeholder(int),
      num_kv_heads=config_dict.placeholder(int), head_dim=config_dict.placeholder(int),
      rope_theta=config_dict.placeholder(float), rope_scaling=config_dict.placeholder(tuple),
      rms_norm_eps=config_dict.placeholder(float),
      tie_embeddings=config_dict.placeholder(bool), qkv_bias=config_dict.placeholder(bool),
      qk_norm=config_dict.placeholder(bool),
      max_position_embeddings=config_dict.placeholder(int),
      num_experts=config_dict.placeholder(int), num_experts_per_tok=config_dict.placeholder(int),
      router_aux_loss_coef=config_dict.placeholder(float)))
  c.student.dtype = "float32"
  c.student.remat = False
  c.student.unroll_layers = True

  c.objective = ml_collections.ConfigDict({
      "kd": {"term": "generalized_jsd", "weight": 1.0, "beta": 0.5},
      "ce": {"term": "cross_entropy", "weight": 0.1}})

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=100, end_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.1, clip_norm=1.0))

  c.data = ml_collections.ConfigDict(dict(
      source="synthetic", path="", eval_path="", num_examples=4096, eval_examples=256,
      seq_len=256, batch_size=32, seed=0, shape="", pack=False, overflow="truncate",
      chat_template=True, split="train", eval_split="", eval_fraction=0.0, name="",
      data_dir="", cache_dir="~/.cache/jkd/datasets", select="", select_fraction=0.5,
      select_reference=""))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, grad_accum=1, log_every=10, max_nan_steps=10, peak_tflops_per_device=989.0,
      progress_bar=True))
  c.eval = ml_collections.ConfigDict(dict(every=200, batches=0, at_start=False))
  c.checkpoint = ml_collections.ConfigDict(dict(
      every=200, keep=3, best_metric="", best_mode="min", async_save=True))
  c.report = ml_collections.ConfigDict(dict(
      enabled=False, samples=3, sample_tokens=48, title="jkd distillation run"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.distributed = ml_collections.ConfigDict(dict(
      initialization_timeout_s=300, heartbeat_timeout_s=60, shutdown_timeout_s=60))
  return c
