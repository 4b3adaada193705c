"""Generate, filter, self-imitate (Symbolic KD, I2D2): ``data.source = "self_imitation"``.

Round 0: the teacher over-generates ``self_imitation.n`` completions per prompt, a critic
(:mod:`jkd.data.critics`: ``teacher_logprob``, ``dotted``, ``classifier``, ``constraints``)
scores them, and the keep rule (the top ``keep_fraction``, those scoring at least
``threshold``, or both) keeps the good part; the student trains on it with the objective (e.g.
``cross_entropy``: labels on the completion only). Rounds ``r >= 1``: the current student
generates, the same critic filters, and the student trains on its own filtered samples
(self-imitation). Each round lasts ``self_imitation.steps_per_round`` steps and every batch logs
the round's ``self_imitation/keep_rate`` (kept / generated), ``score_all`` and ``score_kept``
(the mean critic score of the scored and of the kept samples), ``kept`` and ``round``.

References: West et al., *Symbolic Knowledge Distillation: from General Language Models to
Commonsense Models*, NAACL 2022; Bhagavatula et al., *I2D2: Inductive Knowledge Distillation
with NeuroLogic and Self-Imitation*, ACL 2023.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from jkd.data import corpus
from jkd.data import critics
from jkd.train import config
from jkd.train.sources import round_data


class SelfImitationSource(round_data.RoundSource):
  """Batches of language-model rows (``tokens``, ``labels``) from filtered generations.

  Args:
    prompts: prompt records (``{"prompt": text, ...}``) or texts.
    tokenizer: the teacher's (and student's) tokenizer.
    seq_len, batch_size, steps_per_round, seed, chat_template, generate_batch_size: see
      :class:`jkd.train.sources.round_data.RoundSource`.
    critic: a :data:`jkd.data.critics.CRITICS` name.
    critic_options: its options (``teacher_logprob`` is given the teacher).
    n: samples per prompt and round.
    keep_fraction, threshold: the keep rule (:func:`jkd.data.critics.keep_mask`).
    max_new_tokens, temperature, top_p: sampling.
  """

  prefix = "self_imitation"
  what = "self-imitation"

  def __init__(self, prompts: Sequence[Any], *, tokenizer, seq_len: int, batch_size: int,
               steps_per_round: int, critic: str = "teacher_logprob",
               critic_options: Mapping[str, Any] | None = None, n: int = 4,
               keep_fraction: float = 0.5, threshold: float | None = None,
               max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
               seed: int = 0, chat_template: bool = True, generate_batch_size: int = 8,
               process_index: int | None = None, process_count: int | None = None):
    super().__init__(prompts, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                     steps_per_round=steps_per_round, seed=seed, chat_template=chat_template,
                     generate_batch_size=generate_batch_size, process_index=process_index,
                     process_count=process_count)
    self.keep_fraction, self.threshold = critics.check_keep(keep_fraction, threshold)
    self.n = round_data.check_int("self_imitation.n", n)
    self.max_new_tokens = round_data.check_int("self_imitation.max_new_tokens", max_new_tokens)
    self.temperature, self.top_p = float(temperature), float(top_p)
    if critic not in critics.CRITICS:  # Early: a typo fails before any model is built.
      critics.make_critic(critic)
    self.critic_name, self.critic_options = critic, dict(critic_options or {})
    if not critics.CRITICS[critic].needs_teacher:
      critics.make_critic(critic, **self.critic_options)  # Bad options fail here too.
    self._critic: critics.Critic | None = None

  def critic(self) -> critics.Critic:
    """The critic, built once (with the teacher when it needs one)."""
    if self._critic is None:
      teacher = self.teacher() if critics.CRITICS[self.critic_name].needs_teacher else None
      self._critic = critics.make_critic(self.critic_name, teacher=teacher,
                                         **self.critic_options)
    return self._critic

  def make_round(self, round_index: int) -> dict[str, Any]:
    """Round 0: the teacher generates; later rounds: the current student. The critic filters."""
    model = self.teacher() if round_index == 0 else self.student()
    out = critics.generate_and_filter(
        self.prompts, model=model, tokenizer=self.tokenizer, critic=self.critic(), n=self.n,
        keep_fraction=self.keep_fraction, threshold=self.threshold,
        max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
        seed=self.seed, round_index=round_index, batch_size=self.generate_batch_size,
        chat_template=self.chat_template)
    return {"records": out.kept, "stats": out.stats}

  def rows(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    rows = [round_data.lm_row(self.tokenizer, r["prompt"], r["completion"],
                              seq_len=self.seq_len, chat_template=self.chat_template)
            for r in records]
    rows = [r for r in rows if r is not None]
    if not rows:
      return {}
    return {k: np.stack([r[k] for r in rows]) for k in ("tokens", "labels")}

  def empty_message(self, round_index: int, made: Mapping[str, Any]) -> str:
    s = {k: round(v, 4) for k, v in made.get("stats", {}).items()}
    who = "teacher" if round_index == 0 else "student"
    return (f"self-imitation round {round_index}: the critic {self.critic_name!r} kept no"
            f" usable sample of the {who}'s {self.n} x {len(self.prompts)}"
            f"{' (scores: ' + str(s) + ')' if s else ''}: lower self_imitation.threshold,"
            " raise keep_fraction, n or max_new_tokens, or check that the prompts fit"
            f" data.seq_len={self.seq_len}.")


def self_imitation_sources(cfg, vocab: int, tokenizer) -> tuple[SelfImitationSource, None]:
  """``data.source='self_imitation'``: ``(SelfImitationSource of self_imitation.*, None)``."""
  del vocab
  s = config.section(cfg, "self_imitation", needed_by="data.source='self_imitation'")
  path = os.path.expanduser(s.prompts) if s.prompts else corpus.SHIPPED_PROMPTS
  prompts = corpus.read_prompts(path)
  if int(s.limit) > 0:
    prompts = prompts[:int(s.limit)]
  options = s.critic_options.to_dict() if hasattr(s.critic_options, "to_dict") else dict(
      s.critic_options)
  source = SelfImitationSource(
      prompts, tokenizer=tokenizer, seq_len=int(cfg.data.seq_len),
      batch_size=int(cfg.data.batch_size), steps_per_round=int(s.steps_per_round),
      critic=str(s.critic), critic_options=options, n=int(s.n),
      keep_fraction=float(s.keep_fraction), threshold=float(s.threshold),
      max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
      top_p=float(s.top_p), seed=int(cfg.data.seed), chat_template=bool(cfg.data.chat_template),
      generate_batch_size=int(s.generate_batch_size))
  return source, None
