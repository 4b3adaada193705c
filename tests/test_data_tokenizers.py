"""Teacher/student tokenizer comparison (jkd.data.tokenizers)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jkd.data import tokenizers as toks
from jkd.models import gguf_io

WORDS = ["the", "cat", "sat", "on", "mat", "def", "f", "x", "return", "1", "2", "3"]


def word_level(words=WORDS, *, pre=None, **specials):
  vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "<s>"] + list(words))}
  t = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  t.pre_tokenizer = pre or pre_tokenizers.Whitespace()
  specials = {"unk_token": "<unk>", "eos_token": "</s>", "bos_token": "<s>", **specials}
  return PreTrainedTokenizerFast(tokenizer_object=t, **specials)


def test_identical_tokenizers_match():
  match = toks.compare_tokenizers(word_level(), word_level())
  assert match and match.same and match.vocab_sizes == (15, 15)
  assert match.describe() == ""
  assert toks.check_same_tokenizer(word_level(), word_level(),
                                   cross_tokenizer_objective=False).same


def test_swapped_ids_are_listed():
  swapped = list(WORDS)
  swapped[0], swapped[1] = swapped[1], swapped[0]  # "the" <-> "cat"
  match = toks.compare_tokenizers(word_level(), word_level(swapped))
  assert not match
  assert match.num_vocab_differences == 2
  assert match.vocab_differences == ("the: teacher 3 -> student 4", "cat: teacher 4 -> student 3")
  assert match.special_differences == ()
  assert any("'the cat" in d or "'The quick" in d or "def f" in d
             for d in match.probe_differences)


def test_vocab_size_specials_and_probes():
  bigger = toks.compare_tokenizers(word_level(), word_level(WORDS + ["dog"]))
  assert bigger.vocab_sizes == (15, 16) and bigger.num_vocab_differences == 1
  assert "dog: teacher missing -> student 15" in bigger.vocab_differences
  assert "vocabulary size: teacher 15, student 16" in bigger.describe()

  specials = toks.compare_tokenizers(word_level(), word_level(eos_token="<s>"))
  assert not specials and specials.num_vocab_differences == 0
  assert specials.special_differences == (
      "eos_token: teacher '</s>' (id 1), student '<s>' (id 2)",)

  # Same vocabulary and specials, different splitting: only the probe texts reveal it.
  split = toks.compare_tokenizers(word_level(), word_level(pre=pre_tokenizers.WhitespaceSplit()))
  assert not split and split.num_vocab_differences == 0 and split.special_differences == ()
  assert split.probe_differences
  first = split.probe_differences[0]
  assert "first difference at token" in first and "teacher" in first


def test_check_same_tokenizer_error_and_cross_tokenizer_escape():
  other = word_level(["cat", "the"] + WORDS[2:])
  with pytest.raises(ValueError) as err:
    toks.check_same_tokenizer(word_level(), other, cross_tokenizer_objective=False)
  msg = str(err.value)
  assert "the: teacher 3 -> student 4" in msg
  assert "use the teacher's tokenizer for the student" in msg and "`uld`" in msg
  match = toks.check_same_tokenizer(word_level(), other, cross_tokenizer_objective=True)
  assert not match
  with pytest.raises(TypeError, match="get_vocab"):
    toks.compare_tokenizers(word_level(), object())


def test_smollm2_tokenizer_against_itself_and_a_perturbed_copy():
  tok = gguf_io.load_tokenizer(gguf_io.smollm2_gguf_path())
  assert toks.compare_tokenizers(tok, tok).same
  spec = json.loads(tok.backend_tokenizer.to_str())
  vocab = spec["model"]["vocab"]
  a, b = "Ġthe", "Ġof"  # two frequent tokens: swap their ids
  vocab[a], vocab[b] = vocab[b], vocab[a]
  perturbed = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tok.eos_token,
      bos_token=tok.bos_token, pad_token=tok.pad_token, unk_token=tok.unk_token)
  match = toks.compare_tokenizers(tok, perturbed)
  assert not match and match.num_vocab_differences == 2 and match.vocab_sizes == (49152, 49152)
  teacher_ids = {a: vocab[b], b: vocab[a]}  # before the swap
  assert match.vocab_differences == tuple(
      f"{w}: teacher {teacher_ids[w]} -> student {vocab[w]}"
      for w in sorted(teacher_ids, key=teacher_ids.get))
  assert match.probe_differences  # "The quick brown fox jumps over the lazy dog."
  with pytest.raises(ValueError, match="cross-tokenizer objective"):
    toks.check_same_tokenizer(tok, perturbed, cross_tokenizer_objective=False)
