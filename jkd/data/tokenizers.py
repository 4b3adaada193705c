"""Teacher and student tokenizers: are they the same, and cross-tokenized examples when not.

Token-level distillation compares the two models' distributions over one vocabulary, so it needs
one tokenizer: :func:`compare_tokenizers` checks that (vocabulary, special tokens, and the ids
of a fixed set of probe texts), and :func:`check_same_tokenizer` turns a mismatch into an error
that lists the differences, unless the objective is a cross-tokenizer one (ULD,
:func:`jkd.losses.uld_loss`), for which :func:`cross_tokenize` builds the examples: the
student's tokens and labels, the teacher's tokens, and the alignment between them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jkd.losses import IGNORE_INDEX
from jkd.losses.uld import align_by_offsets

#: Texts both tokenizers must encode identically: prose, unicode (accents, CJK, emoji,
#: combining marks), code, digits, whitespace runs, newlines and tabs, chat markup.
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "naïve café, Zürich, São Paulo, Ærøskøbing",
    "日本語のテキストと中文文本, 한국어",
    "emoji: 🙂🚀👍🏽 and a combining e\u0301",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "3.14159 2718281828 1,000,000 -42 0x1F 1e-9",
    "a  b   c    d\t\te\n\n\nf",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nHi!<|im_end|>\n",
    "",
)

_SPECIALS = ("bos_token", "eos_token", "pad_token", "unk_token")
_SHOW = 5  # differences listed per kind


@dataclasses.dataclass(frozen=True)
class TokenizerMatch:
  """How two tokenizers differ (empty lists when they agree).

  Attributes:
    same: True when every check passed (also ``bool(match)``).
    vocab_sizes: ``(teacher, student)`` vocabulary sizes (``len(tokenizer)``, added tokens in).
    vocab_differences: the first few tokens (by teacher id) with another id, or missing, in the
      student, as ``"token: teacher id -> student id"``.
    num_vocab_differences: how many tokens of either vocabulary differ.
    special_differences: special tokens (bos/eos/pad/unk) that differ, with both values.
    probe_differences: probe texts encoded differently, with the first differing ids.
  """
  same: bool
  vocab_sizes: tuple[int, int]
  vocab_differences: tuple[str, ...] = ()
  num_vocab_differences: int = 0
  special_differences: tuple[str, ...] = ()
  probe_differences: tuple[str, ...] = ()

  def __bool__(self) -> bool:
    return self.same

  def describe(self) -> str:
    """A human-readable list of the differences (empty when the tokenizers agree)."""
    lines = []
    if self.vocab_sizes[0] != self.vocab_sizes[1]:
      lines.append(f"vocabulary size: teacher {self.vocab_sizes[0]}, student"
                   f" {self.vocab_sizes[1]}")
    if self.num_vocab_differences:
      lines.append(f"{self.num_vocab_differences} token(s) with different ids, e.g. "
                   + "; ".join(self.vocab_differences))
    lines += [f"special token {d}" for d in self.special_differences]
    lines += [f"probe text {d}" for d in self.probe_differences]
    return "\n".join(f"  - {line}" for line in lines)


def _vocab(tokenizer) -> dict[str, int]:
  if not hasattr(tokenizer, "get_vocab"):
    raise TypeError(f"expected a Hugging Face tokenizer with get_vocab(), got"
                    f" {type(tokenizer).__name__}; load one with jkd.models.load_tokenizer.")
  return dict(tokenizer.get_vocab())


def _encode(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def compare_tokenizers(teacher_tok, student_tok, *, probe_texts: Sequence[str] = PROBE_TEXTS
                       ) -> TokenizerMatch:
  """Compares two tokenizers: vocabulary, token->id map, special tokens, probe encodings.

  Args:
    teacher_tok: the teacher's Hugging Face tokenizer (``transformers`` tokenizer).
    student_tok: the student's.
    probe_texts: texts both must encode to the same ids (default :data:`PROBE_TEXTS`: unicode,
      code, digits, whitespace runs, chat markup).

  Returns:
    A :class:`TokenizerMatch`; ``bool(match)`` is True when they agree on everything.

  >>> from tokenizers import Tokenizer, models, pre_tokenizers
  >>> from transformers import PreTrainedTokenizerFast
  >>> def word_level(words):
  ...   t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  ...   t.pre_tokenizer = pre_tokenizers.Whitespace()
  ...   return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")
  >>> a, b = word_level(["<unk>", "hi", "there"]), word_level(["<unk>", "there", "hi"])
  >>> bool(compare_tokenizers(a, a)), bool(compare_tokenizers(a, b))
  (True, False)
  >>> compare_tokenizers(a, b).vocab_differences
  ('hi: teacher 1 -> student 2', 'there: teacher 2 -> student 1')
  """
  tv, sv = _vocab(teacher_tok), _vocab(student_tok)
  differing = sorted((tok for tok in tv.keys() | sv.keys() if tv.get(tok) != sv.get(tok)),
                     key=lambda tok: (tv.get(tok, 1 << 62), sv.get(tok, 1 << 62), tok))
  vocab_diffs = tuple(f"{tok}: teacher {tv.get(tok, 'missing')} -> student"
                      f" {sv.get(tok, 'missing')}" for tok in differing[:_SHOW])
  special_diffs = []
  for name in _SPECIALS:
    t_tok, s_tok = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
    t_id, s_id = getattr(teacher_tok, name + "_id", None), getattr(student_tok, name + "_id", None)
    if (t_tok, t_id) != (s_tok, s_id):
      special_diffs.append(f"{name}: teacher {t_tok!r} (id {t_id}), student {s_tok!r}"
                           f" (id {s_id})")
  probe_diffs = []
  for text in probe_texts:
    t_ids, s_ids = _encode(teacher_tok, text), _encode(student_tok, text)
    if t_ids != s_ids:
      k = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b),
               min(len(t_ids), len(s_ids)))
      probe_diffs.append(f"{text[:40]!r}: first difference at token {k}: teacher"
                         f" {t_ids[k:k + 3]}, student {s_ids[k:k + 3]} ({len(t_ids)} vs"
                         f" {len(s_ids)} tokens)")
  sizes = (len(teacher_tok), len(student_tok))
  same = sizes[0] == sizes[1] and not differing and not special_diffs and not probe_diffs
  return TokenizerMatch(same=same, vocab_sizes=sizes, vocab_differences=vocab_diffs,
                        num_vocab_differences=len(differing),
                        special_differences=tuple(special_diffs),
                        probe_differences=tuple(probe_diffs[:_SHOW]))


def check_same_tokenizer(teacher_tok, student_tok, *, cross_tokenizer_objective: bool
                         ) -> TokenizerMatch:
  """Raises unless the tokenizers agree or a cross-tokenizer objective is configured.

  Args:
    teacher_tok, student_tok: the two Hugging Face tokenizers.
    cross_tokenizer_objective: True when the objective compares the models without a shared
      vocabulary (``uld``); then differences are allowed and only reported.

  Returns:
    The :class:`TokenizerMatch`.

  Raises:
    ValueError: the tokenizers differ and no cross-tokenizer objective is configured; the
      message lists the first differences and the fix.
  """
  match = compare_tokenizers(teacher_tok, student_tok)
  if not match and not cross_tokenizer_objective:
    raise ValueError(
        "the teacher and student tokenizers differ, so token-level distillation would compare"
        " unrelated tokens:\n" + match.describe() + "\nFix: use the teacher's tokenizer for the"
        " student, or configure a cross-tokenizer objective such as `uld` (objective"
        " {'uld': 1.0, 'cross_entropy': 1.0}, data from jkd.data.cross_tokenize).")
  return match


# ---------------------------------------------------------------------------------------------
# Cross-tokenized examples.

def _tokenize(tokenizer, prompt: str, completion: str, add_eos: bool, who: str):
  """Ids, char offsets into ``prompt + completion``, and the number of prompt tokens."""
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"the {who} tokenizer ({type(tokenizer).__name__}) is not a fast"
                     " tokenizer: character offsets need one (PreTrainedTokenizerFast).")
  ids, offsets, n_prompt = [], [], 0
  for k, (text, shift) in enumerate(((prompt, 0), (completion, len(prompt)))):
    if not text:
      continue
    # The tokenizer's special tokens (e.g. BOS) only before the first segment.
    enc = tokenizer(text, add_special_tokens=not ids, return_offsets_mapping=True)
    ids += list(enc["input_ids"])
    offsets += [(a + shift, b + shift) if b > a else (a, a) for a, b in enc["offset_mapping"]]
    if k == 0:
      n_prompt = len(ids)
  if add_eos:
    if tokenizer.eos_token_id is None:
      raise ValueError(f"add_eos=True but the {who} tokenizer has no eos_token; pass"
                       " add_eos=False or set tokenizer.eos_token.")
    end = len(prompt) + len(completion)
    ids.append(int(tokenizer.eos_token_id))
    offsets.append((end, end))
  return ids, offsets, n_prompt


def cross_tokenize(text: str | tuple[str, str], teacher_tok, student_tok, seq_len: int, *,
                   add_eos: bool = True, pad_id: int | None = None,
                   teacher_pad_id: int | None = None) -> dict[str, np.ndarray]:
  """One example for cross-tokenizer distillation: student arrays, teacher tokens, alignment.

  The text (or ``prompt + completion``) is tokenized by both tokenizers (prompt and completion
  separately, so that the boundary is a token boundary for both). The student gets the usual
  next-token arrays; the teacher runs on its own tokens, and ``teacher_index`` says which
  teacher position has read the same text as each student position
  (:func:`jkd.losses.align_by_offsets`). Sequences longer than ``seq_len`` are truncated.

  Args:
    text: a document, or a ``(prompt, completion)`` pair (the loss only on the completion).
    teacher_tok, student_tok: Hugging Face fast tokenizers (character offsets needed).
    seq_len: length ``T`` of every returned array.
    add_eos: append each tokenizer's EOS token, so the student learns to stop.
    pad_id, teacher_pad_id: padding ids (default: the tokenizer's pad id, else 0).

  Returns:
    ``{"tokens", "labels", "loss_mask", "teacher_tokens", "teacher_index"}``, each ``[T]``:
    student input ids (int32), next-token labels (``-100`` where none), the student positions
    that count (bool: completion labels), teacher input ids (int32), and the teacher position
    aligned to each student position (int32, ``-1`` = unaligned, left out of the ULD loss).

  Raises:
    ValueError: ``seq_len < 1``, an empty text, or a tokenizer without offsets.

  >>> from tokenizers import Tokenizer, models, pre_tokenizers
  >>> from transformers import PreTrainedTokenizerFast
  >>> def tok(vocab, pre):
  ...   t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
  ...   t.pre_tokenizer = pre
  ...   return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>")
  >>> words = tok(["<unk>", "</s>", "ab", "c"], pre_tokenizers.WhitespaceSplit())
  >>> chars = tok(["<unk>", "</s>", "a", "b", "c"], pre_tokenizers.Sequence(
  ...     [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("", "isolated")]))
  >>> ex = cross_tokenize("ab c", words, chars, 6)      # teacher: words, student: characters
  >>> ex["tokens"].tolist(), ex["labels"].tolist(), ex["teacher_tokens"].tolist()
  ([2, 3, 4, 1, 0, 0], [3, 4, 1, -100, -100, -100], [2, 3, 1, 0, 0, 0])
  >>> ex["teacher_index"].tolist()   # "ab" ends where "b" does, "c" where "c" does
  [-1, 0, 1, -1, -1, -1]
  """
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int (got {seq_len!r}).")
  if isinstance(text, str):
    prompt, completion = "", text
  elif isinstance(text, (tuple, list)) and len(text) == 2 and all(isinstance(t, str)
                                                                  for t in text):
    prompt, completion = text
  else:
    raise ValueError("text must be a string or a (prompt, completion) pair of strings; got"
                     f" {type(text).__name__}.")
  if not completion:
    raise ValueError(f"empty {'completion' if prompt else 'text'}: nothing to train on.")
  s_ids, s_off, s_prompt = _tokenize(student_tok, prompt, completion, add_eos, "student")
  t_ids, t_off, _ = _tokenize(teacher_tok, prompt, completion, add_eos, "teacher")
  pad = _pad_id(student_tok, pad_id)
  t_pad = _pad_id(teacher_tok, teacher_pad_id)

  n = min(len(s_ids) - 1, seq_len)  # input positions that have a label
  tokens = np.full(seq_len, pad, np.int32)
  labels = np.full(seq_len, IGNORE_INDEX, np.int32)
  loss_mask = np.zeros(seq_len, bool)
  m = min(len(s_ids), seq_len)
  tokens[:m] = s_ids[:m]
  if n > 0:
    labels[:n] = s_ids[1:n + 1]
    loss_mask[:n] = np.arange(1, n + 1) >= max(s_prompt, 1)
  teacher_tokens = np.full(seq_len, t_pad, np.int32)
  mt = min(len(t_ids), seq_len)
  teacher_tokens[:mt] = t_ids[:mt]
  index = align_by_offsets(t_off, s_off)[:seq_len]
  index = np.where(index < seq_len, index, -1)  # the teacher's aligned token was truncated
  teacher_index = np.full(seq_len, -1, np.int32)
  teacher_index[:len(index)] = index
  teacher_index[n:] = -1  # positions without a label
  return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
          "teacher_tokens": teacher_tokens, "teacher_index": teacher_index}


def _pad_id(tokenizer, given: int | None) -> int:
  if given is not None:
    return int(given)
  pad = getattr(tokenizer, "pad_token_id", None)
  return int(pad) if pad is not None else 0


def cross_tokenize_batch(texts: Sequence[str | tuple[str, str]], teacher_tok, student_tok,
                         seq_len: int, **options: Any) -> dict[str, np.ndarray]:
  """:func:`cross_tokenize` of every text, stacked into ``[N, seq_len]`` arrays.

  The result is a ``jkd.data.ArraySource`` example dict; the engine runs the teacher on
  ``teacher_tokens`` and the ``uld`` objective term reads ``teacher_index``.
  """
  if not texts:
    raise ValueError("cross_tokenize_batch needs at least one text.")
  rows = [cross_tokenize(t, teacher_tok, student_tok, seq_len, **options) for t in texts]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
