"""jkd.data.examples: next-token labels, completion-only loss, truncation, padding, packing."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jkd import models
from jkd.data import pack_examples, pad_example, tokenize_example

WORDS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant", "system",
         *"the cat sat on a mat dog ran hello world hi there yes no why because".split()]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(*, eos="<|im_end|>", template=TEMPLATE):
  """A word-level tokenizer of :data:`WORDS` (split on whitespace) with a ChatML template."""
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415
  t = Tokenizer(tok_models.WordLevel(dict(ID), unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token=eos,
                                unk_token="<unk>",
                                additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  tok.chat_template = template
  return tok


def ids(*words):
  return [ID[w] for w in words]


def reference(seq, trained, seq_len):
  """Next-token arrays written from the definition, position by position."""
  n = min(len(seq), seq_len)
  tokens, labels = np.zeros(n, np.int64), np.full(n, -100, np.int64)
  for t in range(n):
    tokens[t] = seq[t]
    if t + 1 < len(seq) and trained[t + 1]:
      labels[t] = seq[t + 1]
  return tokens, labels


def check(out, seq, trained, seq_len):
  tokens, labels = reference(seq, trained, seq_len)
  assert out["tokens"].dtype == np.int32 and out["labels"].dtype == np.int32
  np.testing.assert_array_equal(out["tokens"], tokens)
  np.testing.assert_array_equal(out["labels"], labels)
  np.testing.assert_array_equal(out["loss_mask"], labels != -100)


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer()


def test_text_trains_every_token_and_appends_eos(tok):
  out = tokenize_example({"text": b"the cat sat"}, tok, shape="text", seq_len=16)
  seq = ids("the", "cat", "sat", "<|im_end|>")
  check(out, seq, [True] * 4, 16)
  assert out["labels"][-1] == -100  # nothing follows the last token


def test_prompt_completion_without_template(tok):
  out = tokenize_example({"prompt": "hi there", "completion": "hello world"}, tok,
                         shape="prompt_completion", seq_len=16, chat_template=False)
  seq = ids("hi", "there", "hello", "world", "<|im_end|>")
  check(out, seq, [False, False, True, True, True], 16)


def test_prompt_completion_through_the_chat_template(tok):
  out = tokenize_example({"prompt": "hi", "completion": "hello there"}, tok,
                         shape="prompt_completion", seq_len=16)
  seq = ids("<|im_start|>", "user", "hi", "<|im_end|>", "<|im_start|>", "assistant", "hello",
            "there", "<|im_end|>")
  check(out, seq, [False] * 6 + [True] * 3, 16)  # the template's <|im_end|> is the EOS


def test_eos_appended_when_the_template_lacks_it():
  tok = tiny_tokenizer(eos="<eos>")
  out = tokenize_example({"prompt": "hi", "completion": "yes"}, tok, shape="prompt_completion",
                         seq_len=16)
  seq = ids("<|im_start|>", "user", "hi", "<|im_end|>", "<|im_start|>", "assistant", "yes",
            "<|im_end|>", "<eos>")
  check(out, seq, [False] * 6 + [True] * 3, 16)


def test_chat_trains_only_assistant_turns(tok):
  messages = [{"role": "system", "content": "why"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the cat"},
              {"role": "assistant", "content": "yes no"}]
  import json  # noqa: PLC0415
  out = tokenize_example({"messages": json.dumps(messages)}, tok, shape="chat", seq_len=64)
  seq, trained = [], []
  for m in messages:
    turn = ids("<|im_start|>", m["role"], *m["content"].split(), "<|im_end|>")
    seq += turn
    trained += [False] * 2 + [m["role"] == "assistant"] * (len(turn) - 2)
  check(out, seq, trained, 64)
  assert out["loss_mask"].sum() == 5  # hello <im_end> yes no <im_end>


def test_preference_gives_chosen_and_rejected(tok):
  out = tokenize_example({"prompt": "hi", "chosen": "yes", "rejected": "no no"}, tok,
                         shape="preference", seq_len=16)
  head = ids("<|im_start|>", "user", "hi", "<|im_end|>", "<|im_start|>", "assistant")
  for side, words in (("chosen", ["yes"]), ("rejected", ["no", "no"])):
    one = {k: out[f"{side}_{k}"] for k in ("tokens", "labels", "loss_mask")}
    check(one, head + ids(*words, "<|im_end|>"), [False] * 6 + [True] * (len(words) + 1), 16)


def test_truncation_is_counted_and_keeps_the_next_label(tok):
  counts = collections.Counter()
  text = "the cat sat on a mat"
  out = tokenize_example({"text": text}, tok, shape="text", seq_len=4, counts=counts)
  seq = ids(*text.split(), "<|im_end|>")
  check(out, seq, [True] * len(seq), 4)
  assert out["labels"][-1] == ID["a"] and counts == {"truncated": 1}
  # The completion cut away entirely: nothing to train, skipped and counted.
  assert tokenize_example({"prompt": "the cat sat on a", "completion": "yes"}, tok,
                          shape="prompt_completion", seq_len=4, chat_template=False,
                          counts=counts) is None
  assert counts == {"truncated": 2, "no_target": 1}


def test_errors(tok):
  with pytest.raises(ValueError, match=r"train example 3 has 7 tokens, more than"
                     r" data.seq_len=4; raise data.seq_len, or set data.overflow='truncate'"):
    tokenize_example({"text": "the cat sat on a mat"}, tok, shape="text", seq_len=4,
                     overflow="error", name="train example 3")
  with pytest.raises(ValueError, match="empty completion"):
    tokenize_example({"prompt": "hi", "completion": " "}, tok, shape="prompt_completion",
                     seq_len=8)
  with pytest.raises(ValueError, match="empty or non-string text"):
    tokenize_example({"text": ""}, tok, shape="text", seq_len=8)
  with pytest.raises(ValueError, match="token id 23 is outside the model's vocabulary of 20"):
    tokenize_example({"text": "because"}, tok, shape="text", seq_len=8, vocab_size=20)
  with pytest.raises(ValueError, match="'chat' example needs chat_template=True"):
    tokenize_example({"messages": "[]"}, tok, shape="chat", seq_len=8, chat_template=False)
  bad = tiny_tokenizer(template=TEMPLATE.replace("<|im_start|>assistant\n{% endif",
                                                 "<|im_start|>system\n{% endif"))
  with pytest.raises(ValueError, match="not a prefix of the whole conversation"):
    tokenize_example({"prompt": "hi", "completion": "yes"}, bad, shape="prompt_completion",
                     seq_len=16)
  with pytest.raises(ValueError, match="no chat template"):
    tokenize_example({"prompt": "hi", "completion": "yes"}, tiny_tokenizer(template=None),
                     shape="prompt_completion", seq_len=16)
  with pytest.raises(ValueError, match="unknown shape 'csv'"):
    tokenize_example({"text": "a"}, tok, shape="csv", seq_len=8)


def test_pad_example():
  ex = {"tokens": np.array([4, 5], np.int32), "labels": np.array([5, -100], np.int32),
        "loss_mask": np.array([True, False]), "teacher_topk_ids": np.ones((2, 3), np.uint16)}
  out = pad_example(ex, 4)
  np.testing.assert_array_equal(out["tokens"], [4, 5, 0, 0])
  np.testing.assert_array_equal(out["labels"], [5, -100, -100, -100])
  np.testing.assert_array_equal(out["loss_mask"], [True, False, False, False])
  assert out["teacher_topk_ids"].shape == (4, 3) and out["teacher_topk_ids"].dtype == np.uint16
  np.testing.assert_array_equal(out["teacher_topk_ids"][2:], 0)
  with pytest.raises(ValueError, match="pad_example needs"):
    pad_example(ex, 1)


def doc(n, start):
  toks = np.arange(start, start + n, dtype=np.int32)
  return {"tokens": toks, "labels": np.append(toks[1:], -100).astype(np.int32),
          "loss_mask": np.append(np.ones(n - 1, bool), False)}


def test_packing_places_every_document_once():
  lengths = [5, 3, 7, 2, 6, 4, 8, 1]
  docs = [doc(n, 100 * i) for i, n in enumerate(lengths)]
  rows = list(pack_examples(docs, 8, num_bins=2))
  found = []
  for row in rows:
    seg = row["segment_ids"]
    assert seg.shape == row["positions"].shape == (8,)
    k = seg.max()
    assert sorted(set(seg[seg > 0])) == list(range(1, k + 1))
    np.testing.assert_array_equal(row["labels"][seg == 0], -100)
    assert not row["loss_mask"][seg == 0].any()
    for s in range(1, k + 1):
      where = np.flatnonzero(seg == s)
      assert (np.diff(where) == 1).all()  # contiguous
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      found.append({key: row[key][where] for key in ("tokens", "labels", "loss_mask")})
  assert len(found) == len(docs)
  for d in docs:
    match = [f for f in found if f["tokens"][0] == d["tokens"][0]]
    assert len(match) == 1
    for key in d:
      np.testing.assert_array_equal(match[0][key], d[key])
  # First fit with 2 open rows: [5+3, 7] then 2 fits neither -> new group [2+6, 4], ...
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1] * 5 + [2] * 3)
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1] * 7 + [0])
  with pytest.raises(ValueError, match="cannot be packed into rows of 8"):
    list(pack_examples([doc(9, 0)], 8))


def test_packed_row_logits_equal_each_document_alone():
  config = models.ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                              num_layers=2, num_heads=4, num_kv_heads=2)
  params = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  docs = []
  for n in (5, 4, 6, 3):
    toks = rng.integers(0, 128, n).astype(np.int32)
    docs.append({"tokens": toks, "labels": np.append(toks[1:], -100).astype(np.int32),
                 "loss_mask": np.ones(n, bool)})
  rows = list(pack_examples(docs, 12, num_bins=2))
  assert len(rows) < len(docs)
  # One [4, 12] shape for every call (two compilations): packed rows padded with empty rows,
  # and each document alone, right-padded (causal attention: padding after it is not seen).
  def stack(arrays):
    out = np.zeros((len(docs), 12), np.int32)
    for i, a in enumerate(arrays):
      out[i, :len(a)] = a
    return jnp.asarray(out)

  packed_fn = jax.jit(lambda p, t, s, pos: models.apply(p, t, config=config, segment_ids=s,
                                                        positions=pos).logits)
  plain_fn = jax.jit(lambda p, t: models.apply(p, t, config=config).logits)
  packed = np.asarray(packed_fn(params, *(stack([r[k] for r in rows])
                                          for k in ("tokens", "segment_ids", "positions"))))
  alone = np.asarray(plain_fn(params, stack([d["tokens"] for d in docs])))
  checked = 0
  for r, row in enumerate(rows):
    for s in range(1, row["segment_ids"].max() + 1):
      where = np.flatnonzero(row["segment_ids"] == s)
      (i,) = [i for i, d in enumerate(docs) if np.array_equal(d["tokens"], row["tokens"][where])]
      np.testing.assert_allclose(packed[r, where], alone[i, :len(where)], atol=2e-5, rtol=1e-5)
      checked += 1
  assert checked == len(docs)
  # Without segment ids the second document would see the first: the logits differ.
  mixed = np.asarray(plain_fn(params, stack([r["tokens"] for r in rows])))
  second = np.flatnonzero(rows[0]["segment_ids"] == 2)
  assert not np.allclose(mixed[0, second], packed[0, second], atol=1e-3)


def test_smollm2_prompt_completion_labels_are_the_completion():
  from jkd.models import gguf_io  # noqa: PLC0415
  tok = gguf_io.load_tokenizer(gguf_io.smollm2_gguf_path())
  out = tokenize_example({"prompt": "Hi", "completion": "Hello there"}, tok,
                         shape="prompt_completion", seq_len=64, vocab_size=49152)
  labels = out["labels"][out["loss_mask"]]
  assert tok.decode(labels) == "Hello there<|im_end|>\n"
  prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True)["input_ids"]
  np.testing.assert_array_equal(out["tokens"][:len(prompt)], prompt)
  assert not out["loss_mask"][:len(prompt) - 1].any() and out["loss_mask"][len(prompt) - 1]
