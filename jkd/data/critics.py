"""Critics: scores that decide which generated texts are kept (generate, filter, self-imitate).

Symbolic Knowledge Distillation and I2D2 distil by *generating* far more text than is needed and
*keeping the good part*: a critic scores every sample and a keep rule (:func:`keep_mask`: the top
fraction, a score threshold, or both) selects the training data; :func:`generate_and_filter`
does one such round for a model and a set of prompts. A critic maps sampled completions
(:class:`jkd.data.Candidate`) to ``[N]`` float scores, higher is better. The registry
:data:`CRITICS` holds

==================  =============================================================================
``teacher_logprob``  the completion's mean per-token log-likelihood under the teacher (given by
                     the caller as ``teacher=(params, config)``)
``dotted``           a reward function by dotted name, ``module.path:function``, called once
                     with all texts: ``fn(prompts: list[str], texts: list[str]) -> [N] floats``
``classifier``       a classifier by dotted name, ``fn(prompts, texts)`` returning ``[N]``
                     probabilities of "good" or ``[N, C]`` class probabilities (the score is
                     class ``label``'s): I2D2's and Symbolic KD's critic, a fine-tuned
                     RoBERTa in the papers, is one such function
``constraints``      the share of constraints on the text that hold: word counts
                     (``min_words``/``max_words``), ``required``/``forbidden`` words or
                     phrases, a ``regex`` that must match
==================  =============================================================================

:func:`register_critic` adds yours. References: West et al., *Symbolic Knowledge Distillation:
from General Language Models to Commonsense Models*, NAACL 2022; Bhagavatula et al., *I2D2:
Inductive Knowledge Distillation with NeuroLogic and Self-Imitation*, ACL 2023.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from jkd.data import preference
from jkd.data import scoring
from jkd.data.scoring import Candidate
from jkd.losses import _common

#: A critic: candidates -> ``[len(candidates)]`` float scores (higher is better).
Critic = Callable[[Sequence[Candidate]], np.ndarray]


class CriticEntry(NamedTuple):
  """An entry of :data:`CRITICS`: ``factory(**options) -> Critic``; ``needs_teacher``: the
  factory takes ``teacher=(params, config)`` (given by :func:`make_critic`'s caller)."""
  factory: Callable[..., Critic]
  needs_teacher: bool = False


#: Critic name -> :class:`CriticEntry`. Add yours with :func:`register_critic`.
CRITICS: dict[str, CriticEntry] = {}


def register_critic(name: str, *, needs_teacher: bool = False):
  """Decorator: registers a critic factory in :data:`CRITICS`."""
  def decorator(factory):
    if name in CRITICS:
      raise ValueError(f"a critic named {name!r} is already registered.")
    CRITICS[name] = CriticEntry(factory, needs_teacher)
    return factory
  return decorator


def make_critic(name: str, *, teacher: tuple[Any, Any] | None = None, **options) -> Critic:
  """The critic ``name`` of :data:`CRITICS`, built with its ``options``.

  Args:
    name: a registered critic.
    teacher: ``(params, config)`` of the teacher, passed to the critics that need it
      (``teacher_logprob``) and ignored by the others.
    **options: the critic's options.

  Raises:
    ValueError: an unknown critic (naming the nearest registered ones), a critic that needs the
      teacher without one, or options the critic rejects.

  >>> critic = make_critic("constraints", min_words=2)
  >>> c = lambda text: Candidate("p", np.array([1]), text, np.array([1]), {})
  >>> critic([c("one"), c("one two")]).tolist()
  [0.0, 1.0]
  """
  if name not in CRITICS:
    near = _common.nearest_names(str(name), CRITICS)
    raise ValueError(f"unknown critic {name!r}" + (f"; did you mean {near}?" if near else ".")
                     + f" Registered critics: {sorted(CRITICS)}.")
  entry = CRITICS[name]
  if entry.needs_teacher:
    if teacher is None:
      raise ValueError(f"critic {name!r} scores with the teacher: pass teacher=(params,"
                       " config).")
    options = {**options, "teacher": teacher}
  try:
    return entry.factory(**options)
  except TypeError as e:
    raise ValueError(f"critic {name!r}: bad options {sorted(options)} ({e}).") from None


def critic_scores(critic: Critic, candidates: Sequence[Candidate]) -> np.ndarray:
  """The critic's ``[len(candidates)]`` float64 scores, checked to be one finite score each."""
  if not candidates:
    return np.zeros((0,), np.float64)
  scores = np.asarray(critic(candidates), np.float64)
  if scores.shape != (len(candidates),) or not np.isfinite(scores).all():
    raise ValueError(f"the critic must return {len(candidates)} finite scores, got shape"
                     f" {list(scores.shape)}"
                     + (f" with {int((~np.isfinite(scores)).sum())} non-finite."
                        if scores.size else "."))
  return scores


# ------------------------------------------------------------------------------------------------
# The critics


@register_critic("teacher_logprob", needs_teacher=True)
def teacher_logprob_critic(*, teacher: tuple[Any, Any], batch_size: int = 8) -> Critic:
  """Mean per-token log-likelihood of the completion (stop token included) under the teacher,
  given the prompt: ``(1/L) sum_t log p_T(y_t | x, y_<t)`` (:func:`jkd.data.make_scorer`'s
  ``teacher_logprob``). The teacher and the generator share the tokenizer."""
  params, config = teacher
  return scoring.teacher_logprob_scorer(params=params, config=config, batch_size=batch_size)


def _texts(candidates: Sequence[Candidate]) -> tuple[list[str], list[str]]:
  return [c.prompt for c in candidates], [c.completion for c in candidates]


def _resolve(fn: str | Callable, what: str) -> Callable:
  if callable(fn):
    return fn
  try:
    return scoring.resolve_callable(fn)
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None


@register_critic("dotted")
def dotted_critic(*, fn: str | Callable[[list[str], list[str]], Sequence[float]]) -> Critic:
  """A batched reward ``fn(prompts, texts) -> [N] floats``, or its dotted name
  ``module.path:function`` (imported on PYTHONPATH)."""
  reward = _resolve(fn, "critic 'dotted'")

  def score(candidates: Sequence[Candidate]) -> np.ndarray:
    out = np.asarray(reward(*_texts(candidates)), np.float64)
    if out.shape != (len(candidates),):
      raise ValueError(f"critic 'dotted' {fn!r} returned shape {list(out.shape)} for"
                       f" {len(candidates)} texts; it must return one float per text.")
    return out
  return score


@register_critic("classifier")
def classifier_critic(*, fn: str | Callable[[list[str], list[str]], Any],
                      label: int = -1) -> Critic:
  """A classifier ``fn(prompts, texts)`` by dotted name (or callable): ``[N]`` probabilities
  that a text is good, or ``[N, C]`` class probabilities (rows summing to 1) of which the score
  is column ``label`` (default the last: "acceptable" of a binary classifier)."""
  clf = _resolve(fn, "critic 'classifier'")
  if isinstance(label, bool) or not isinstance(label, numbers.Integral):
    raise ValueError(f"critic 'classifier': label must be a class index, got {label!r}.")

  def score(candidates: Sequence[Candidate]) -> np.ndarray:
    p = np.asarray(clf(*_texts(candidates)), np.float64)
    n = len(candidates)
    if p.ndim not in (1, 2) or p.shape[0] != n:
      raise ValueError(f"critic 'classifier' {fn!r} returned shape {list(p.shape)}; it must"
                       f" return [{n}] probabilities or [{n}, classes] class probabilities.")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
      raise ValueError(f"critic 'classifier' {fn!r} returned values outside [0, 1]; it must"
                       " return probabilities (apply a softmax or sigmoid to logits).")
    if p.ndim == 1:
      return p
    if not np.allclose(p.sum(-1), 1.0, atol=1e-3):
      raise ValueError(f"critic 'classifier' {fn!r}: class probabilities must sum to 1 per"
                       " text (apply a softmax to logits).")
    if not -p.shape[1] <= label < p.shape[1]:
      raise ValueError(f"critic 'classifier': label {label} is not a class of the"
                       f" {p.shape[1]} the classifier returned.")
    return p[:, label]
  return score


def _words(text: str) -> list[str]:
  return re.findall(r"\w+", text)


def _phrase(pattern: str, case_sensitive: bool) -> re.Pattern:
  return re.compile(r"(?<!\w)" + re.escape(pattern) + r"(?!\w)",
                    0 if case_sensitive else re.IGNORECASE)


def _string_list(value, name: str) -> list[str]:
  if isinstance(value, str):
    value = [value]
  value = list(value or ())
  if not all(isinstance(v, str) and v.strip() for v in value):
    raise ValueError(f"critic 'constraints': {name} must be non-empty strings, got {value!r}.")
  return value


@register_critic("constraints")
def constraints_critic(*, min_words: int = 0, max_words: int = 0,
                       required: Sequence[str] = (), forbidden: Sequence[str] = (),
                       regex: str = "", case_sensitive: bool = False) -> Critic:
  r"""The share of the given constraints the completion satisfies, in ``[0, 1]`` (1: all).

  One check each: at least ``min_words`` words (``\w+`` runs; 0: no check), at most
  ``max_words`` (0: no check), each ``required`` word or phrase present and each ``forbidden``
  one absent (whole words, case-insensitive unless ``case_sensitive``), ``regex`` found
  (``re.search``; ``""``: no check). I2D2 imposes such lexical constraints while decoding
  (NeuroLogic); here they filter the samples (keep with ``threshold=1.0`` for "all hold").

  Raises:
    ValueError: no constraint given, negative counts, ``min_words > max_words``, or a regex that
      does not compile.
  """
  for name, v in (("min_words", min_words), ("max_words", max_words)):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
      raise ValueError(f"critic 'constraints': {name} must be an int >= 0 (0: no check), got"
                       f" {v!r}.")
  if max_words and min_words > max_words:
    raise ValueError(f"critic 'constraints': min_words {min_words} > max_words {max_words}.")
  required, forbidden = _string_list(required, "required"), _string_list(forbidden, "forbidden")
  try:
    pattern = re.compile(regex) if regex else None
  except re.error as e:
    raise ValueError(f"critic 'constraints': regex {regex!r} does not compile ({e}).") from None
  need = [_phrase(w, case_sensitive) for w in required]
  ban = [_phrase(w, case_sensitive) for w in forbidden]
  checks = int(min_words > 0) + int(max_words > 0) + len(need) + len(ban) + int(bool(pattern))
  if not checks:
    raise ValueError("critic 'constraints' needs at least one constraint: min_words,"
                     " max_words, required, forbidden or regex.")

  def one(text: str) -> float:
    n = len(_words(text))
    ok = (int(min_words > 0 and n >= min_words) + int(max_words > 0 and n <= max_words)
          + sum(bool(p.search(text)) for p in need) + sum(not p.search(text) for p in ban)
          + int(pattern is not None and pattern.search(text) is not None))
    return ok / checks

  return lambda candidates: np.asarray([one(c.completion) for c in candidates], np.float64)


# ------------------------------------------------------------------------------------------------
# The keep rule and one generate-and-filter round


def check_keep(keep_fraction: Any, threshold: Any = None) -> tuple[float, float | None]:
  """Validates the keep rule's options: ``keep_fraction`` in ``(0, 1]``, ``threshold`` a
  number or None (``-inf`` counts as None)."""
  if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real) or not (
      0 < float(keep_fraction) <= 1):
    raise ValueError(f"keep_fraction must lie in (0, 1] (the share of the scored samples kept),"
                     f" got {keep_fraction!r}.")
  if threshold is not None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(
        threshold) or threshold == math.inf:
      raise ValueError(f"threshold must be a number (or None / -inf: no threshold), got"
                       f" {threshold!r}.")
    if threshold == -math.inf:
      threshold = None
  return float(keep_fraction), None if threshold is None else float(threshold)


def keep_mask(scores: Any, *, keep_fraction: float = 1.0,
              threshold: float | None = None) -> np.ndarray:
  """Which samples a round keeps: the top ``ceil(keep_fraction * N)`` by score that also score
  at least ``threshold``.

  Ties at the cut go to the earlier sample (a stable order), so the rule is deterministic.

  Args:
    scores: ``[N]`` critic scores.
    keep_fraction: the share kept, in ``(0, 1]`` (1: no top-fraction cut).
    threshold: the lowest score kept (None or ``-inf``: no threshold).

  Returns:
    ``[N]`` bool.

  >>> keep_mask([0.1, 0.9, 0.5, 0.9], keep_fraction=0.5).tolist()
  [False, True, False, True]
  >>> keep_mask([0.1, 0.9, 0.5], threshold=0.5).tolist()
  [False, True, True]
  """
  keep_fraction, threshold = check_keep(keep_fraction, threshold)
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not np.isfinite(scores).all():
    raise ValueError(f"scores must be [N] finite floats, got shape {list(scores.shape)}.")
  n = scores.size
  keep = np.zeros(n, bool)
  top = math.ceil(keep_fraction * n - 1e-9)
  keep[np.argsort(-scores, kind="stable")[:top]] = True
  if threshold is not None:
    keep &= scores >= threshold
  return keep


class Filtered(NamedTuple):
  """One generate-and-filter round (:func:`generate_and_filter`).

  Attributes:
    kept: ``{"prompt", "completion", "score", "domain"}`` of each kept sample, in prompt order.
    stats: ``generated`` (samples drawn), ``scored`` (non-empty, distinct per prompt: what the
      critic saw), ``kept``, ``keep_rate`` (``kept / generated``), ``score_all`` and
      ``score_kept`` (the mean critic score of the scored and of the kept samples; NaN for none).
  """
  kept: list[dict[str, Any]]
  stats: dict[str, float]


def sample(prompts: Sequence[Any], *, model: tuple[Any, Any], tokenizer, n: int,
           max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
           seed: int = 0, round_index: int = 0, stream: int = 0, batch_size: int = 8,
           chat_template: bool = True) -> list[Candidate]:
  """``n`` sampled completions per prompt (``n`` consecutive per prompt), as candidates.

  The key is ``fold_in(fold_in(key(seed), stream), round_index)``: ``stream`` separates the
  kinds of samples a recipe draws (e.g. QCRD's teacher positives and student negatives), and
  each round draws fresh ones. Uses the sampling of :func:`jkd.data.make_pairs`.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be an int >= 1 (samples per prompt), got {n!r}.")
  params, config = model
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
  # The sampling helpers of jkd.data.preference (shared with make_pairs).
  records = preference._prompt_records(prompts, tokenizer, decode, chat_template)  # noqa: SLF001
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), round_index)
  return preference._sample_candidates(  # noqa: SLF001
      records, n, params=params, config=config, key=key, batch_size=batch_size,
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
      eos_id=preference._eos_id(tokenizer), decode=decode)  # noqa: SLF001


def filter_candidates(candidates: Sequence[Candidate], critic: Critic, *,
                      keep_fraction: float = 1.0, threshold: float | None = None) -> Filtered:
  """Scores candidates with the critic and keeps the good part (:func:`keep_mask`).

  Empty completions, and repeats of a completion already seen for the same prompt, are dropped
  before scoring: never kept, and not in ``score_all`` (they still count in ``generated``).
  """
  keep_fraction, threshold = check_keep(keep_fraction, threshold)
  seen, unique = set(), []
  for c in candidates:
    key = (c.prompt, c.completion)
    if c.completion.strip() and key not in seen:
      seen.add(key)
      unique.append(c)
  scores = critic_scores(critic, unique)
  mask = (keep_mask(scores, keep_fraction=keep_fraction, threshold=threshold) if unique
          else np.zeros(0, bool))
  kept = [{"prompt": c.prompt, "completion": c.completion, "score": float(s),
           "domain": str(c.example.get("domain", ""))}
          for c, s, k in zip(unique, scores, mask) if k]
  mean = lambda x: float(np.mean(x)) if len(x) else math.nan  # noqa: E731
  generated = len(candidates)
  stats = {"generated": float(generated), "scored": float(len(unique)),
           "kept": float(len(kept)), "keep_rate": len(kept) / generated if generated else 0.0,
           "score_all": mean(scores), "score_kept": mean(scores[mask])}
  return Filtered(kept, stats)


def generate_and_filter(prompts: Sequence[Any], *, model: tuple[Any, Any], tokenizer,
                        critic: Critic, n: int = 4, keep_fraction: float = 1.0,
                        threshold: float | None = None, **sampling) -> Filtered:
  """One round of Symbolic KD / I2D2: ``model`` generates ``n`` completions per prompt, the
  critic scores them, the keep rule keeps the good part.

  Args:
    prompts: text prompts or records ``{"prompt": text, "domain": ...}``.
    model: ``(params, config)`` of the generator (the teacher in round 0, then the student).
    tokenizer: encodes prompts, decodes samples, gives EOS.
    critic: a :data:`Critic` (e.g. :func:`make_critic`).
    n: samples per prompt.
    keep_fraction, threshold: the keep rule (:func:`keep_mask`).
    **sampling: :func:`sample`'s options (``max_new_tokens``, ``temperature``, ``top_p``,
      ``seed``, ``round_index``, ``batch_size``, ``chat_template``).

  Returns:
    :class:`Filtered`.
  """
  check_keep(keep_fraction, threshold)
  candidates = sample(prompts, model=model, tokenizer=tokenizer, n=n, **sampling)
  return filter_candidates(candidates, critic, keep_fraction=keep_fraction, threshold=threshold)


def self_consistent(texts: Sequence[str], pattern: str = "") -> list[bool]:
  r"""Self-consistency: which of one prompt's samples give the majority answer.

  The answer of a text is the last match of ``pattern`` in it (its first group when the pattern
  has one, else the whole match), whitespace-stripped; the majority answer is the most common
  one (ties: the one seen first). A text without a match, or empty, is never kept. With
  ``pattern=""`` every non-empty text is kept (no answers to vote on).

  >>> self_consistent(["so 4", "so 5", "thus 4", "no idea"], r"(\d+)")
  [True, False, True, False]
  """
  if not pattern:
    return [bool(t.strip()) for t in texts]
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"answer pattern {pattern!r} does not compile ({e}).") from None
  answers = []
  for t in texts:
    found = list(regex.finditer(t)) if t.strip() else []
    m = found[-1] if found else None
    answers.append(None if m is None else (m.group(1) if regex.groups else m.group(0)).strip())
  counts: dict[str, int] = {}
  for a in answers:
    if a is not None:
      counts[a] = counts.get(a, 0) + 1
  if not counts:
    return [False] * len(texts)
  best = max(counts, key=lambda a: counts[a])  # dicts keep insertion order: ties -> first seen
  return [a == best for a in answers]

