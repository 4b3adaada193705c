"""jkd.data.pipeline: exact resume, process shards, seeds, passthrough; the engine on JSONL."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jkd.data import DataPipeline, build_jsonl_dataset, text_pipeline, tokenize_example
from jkd.data import pad_example, tokenized_transform, write_dataset, tensor_feature

from test_data_examples import tiny_tokenizer


def source(n=12):
  """Example i: tokens [i*10, ..., i*10 + (i % 3)] (lengths 1..3), so the first token is i*10."""
  return [{"tokens": np.arange(10 * i, 10 * i + i % 3 + 1, dtype=np.int32)} for i in range(n)]


def first_ids(batch):
  """Example index of each document in a (padded or packed) batch."""
  if "segment_ids" not in batch:
    return list(batch["tokens"][:, 0] // 10)
  starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  return list(batch["tokens"][starts] // 10)


def take(pipe, k):
  return [next(pipe) for _ in range(k)]


def make(n=12, **kw):
  kw = {"batch_size": 4, "seq_len": 4, "process_index": 0, "process_count": 1, **kw}
  return DataPipeline(source(n), **kw)


def skip_multiples_of_5(ex, *, name, counts):
  del name, counts
  return None if ex["tokens"][0] % 50 == 0 else tokenized_transform(4)(ex)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 7])  # 3 batches per epoch: also boundaries
def test_restored_state_gives_the_same_next_batches(pack, consumed):
  kw = dict(seed=1, pack=pack, transform=skip_multiples_of_5)
  pipe = make(**kw)
  take(pipe, consumed)
  state = json.loads(json.dumps(pipe.get_state()))  # as it goes through a checkpoint
  expected = take(pipe, 5)
  restored = make(**kw)
  restored.set_state(state)
  for a, b in zip(expected, take(restored, 5)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert restored.counts["skipped"] > 0


def test_every_example_once_per_epoch_across_two_processes():
  n, epochs = 12, 3  # 12 examples, global batch 4: 3 batches per epoch
  parts = [take(make(n, seed=7, process_index=p, process_count=2), 3 * epochs) for p in (0, 1)]
  for p in (0, 1):
    assert all(b["tokens"].shape == (2, 4) for b in parts[p])
  orders = []
  for e in range(epochs):
    seen = [first_ids(b) for p in (0, 1) for b in parts[p][3 * e:3 * e + 3]]
    flat = sorted(int(i) for ids in seen for i in ids)
    assert flat == list(range(n))  # each example exactly once, by exactly one process
    orders.append([int(i) for b in parts[0][3 * e:3 * e + 3] for i in first_ids(b)])
  assert orders[0] != orders[1]  # reshuffled every epoch
  # The two processes' rows together are what one process serves (process p takes every
  # p-th example of the global stream).
  whole = [int(i) for b in take(make(n, seed=7), 3) for i in first_ids(b)]
  assert sorted(whole) == list(range(n))
  assert whole[0::2] == [int(i) for b in parts[0][:3] for i in first_ids(b)]


def test_same_seed_same_order_other_seed_other_order():
  a = [first_ids(b) for b in take(make(seed=3), 6)]
  b = [first_ids(b) for b in take(make(seed=3), 6)]
  c = [first_ids(b) for b in take(make(seed=4), 6)]
  assert a == b and a != c
  assert [first_ids(b) for b in take(make(shuffle=False), 3)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                  [8, 9, 10, 11]]


def test_state_of_another_pipeline_is_an_error():
  state = make(seed=0).get_state()
  with pytest.raises(ValueError, match="has batch_size=4 but this pipeline has batch_size=8"):
    make(batch_size=8).set_state(state)
  with pytest.raises(ValueError, match="has num_examples=12 but this pipeline has"
                     " num_examples=13"):
    make(13).set_state(state)
  with pytest.raises(ValueError, match="not written by a DataPipeline"):
    make().set_state({"epoch": 0, "index": 1})
  with pytest.raises(ValueError, match="no position for process 1"):
    make(process_index=1, process_count=2, batch_size=4).set_state(
        make(process_count=2, batch_size=4).get_state())


def test_one_epoch_is_in_order_and_leaves_the_position():
  pipe = make(10, seed=2)
  next(pipe)
  state = pipe.get_state()
  batches = list(pipe.one_epoch())
  assert [first_ids(b) for b in batches[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert first_ids(batches[2])[:2] == [8, 9]  # the last batch completed with empty rows
  assert (batches[2]["labels"][2:] == -100).all() and not batches[2]["loss_mask"][2:].any()
  assert pipe.get_state() == state
  half = list(make(10, process_index=1, process_count=2).one_epoch())
  assert [first_ids(b) for b in half[:2]] == [[2, 3], [6, 7]]
  assert len(half) == 3 and not half[2]["loss_mask"].any()


def test_packing_fills_rows_with_segments():
  batch = next(make(shuffle=False, pack=True))
  assert set(batch) == {"tokens", "labels", "loss_mask", "segment_ids", "positions"}
  # Lengths 1, 2, 3, 1, 2, 3, ...: the first row holds several documents.
  assert batch["segment_ids"][0].max() > 1
  seg = batch["segment_ids"]
  np.testing.assert_array_equal(batch["labels"][seg == 0], -100)


def test_tokenized_passthrough_casts_and_pads(tmp_path):
  rng = np.random.default_rng(0)
  feats = {"tokens": tensor_feature(np.uint16), "labels": tensor_feature(np.int32),
           "loss_mask": tensor_feature(np.bool_),
           "teacher_topk_ids": tensor_feature(np.uint16, (None, 3)),
           "teacher_topk_logprobs": tensor_feature(np.float16, (None, 3)),
           "teacher_tail_logprob": tensor_feature(np.float16)}
  rows = []
  for i in range(4):
    t = 6 if i % 2 else 5  # one shorter than seq_len: padded
    rows.append({"tokens": rng.integers(0, 60000, t).astype(np.uint16),
                 "labels": rng.integers(0, 100, t).astype(np.int32),
                 "loss_mask": np.ones(t, bool),
                 "teacher_topk_ids": rng.integers(0, 60000, (t, 3)).astype(np.uint16),
                 "teacher_topk_logprobs": -rng.random((t, 3)).astype(np.float16),
                 "teacher_tail_logprob": -rng.random(t).astype(np.float16)})
  path = write_dataset(str(tmp_path), "cache", feats, {"train": iter(rows)})
  pipe = text_pipeline(path, "train", batch_size=4, seq_len=6, shuffle=False,
                       process_index=0, process_count=1)
  batch = next(pipe)
  want = {"tokens": np.int32, "labels": np.int32, "loss_mask": np.bool_,
          "teacher_topk_ids": np.int32, "teacher_topk_logprobs": np.float32,
          "teacher_tail_logprob": np.float32}
  assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(v) for k, v in want.items()}
  for i, row in enumerate(rows):
    padded = pad_example(row, 6)
    for k in want:
      np.testing.assert_array_equal(batch[k][i], padded[k].astype(want[k]))
  assert not batch["loss_mask"][0, 5] and batch["labels"][0, 5] == -100
  with pytest.raises(ValueError, match="outside the model's vocabulary of 1000"):
    next(text_pipeline(path, "train", batch_size=4, seq_len=6, vocab_size=1000,
                       process_index=0, process_count=1))
  with pytest.raises(ValueError, match="has 6 tokens, more than data.seq_len=5"):
    next(text_pipeline(path, "train", batch_size=4, seq_len=5, overflow="error",
                       shuffle=False, process_index=0, process_count=1))


LINES = [("hi", "hello there"), ("the cat", "sat on a mat"), ("why", "because"),
         ("a dog", "ran"), ("hello", "hi"), ("yes", "no no no")]


def jsonl_file(tmp_path):
  path = tmp_path / "pc.jsonl"
  with open(path, "w") as f:
    for p, c in LINES:
      print(json.dumps({"prompt": p, "completion": c, "domain": "toy"}), file=f)
  return str(path)


def test_text_pipeline_tokenizes_jsonl(tmp_path):
  tok = tiny_tokenizer()
  path = build_jsonl_dataset(jsonl_file(tmp_path), str(tmp_path), "pc")
  pipe = text_pipeline(path, "train", batch_size=2, seq_len=12, tokenizer=tok, shuffle=False,
                       process_index=0, process_count=1)
  batches = take(pipe, 3)
  for i, (p, c) in enumerate(LINES):
    want = pad_example(tokenize_example({"prompt": p, "completion": c}, tok,
                                        shape="prompt_completion", seq_len=12), 12)
    for k in want:
      np.testing.assert_array_equal(batches[i // 2][k][i % 2], want[k])
  truncating = text_pipeline(path, "train", batch_size=2, seq_len=6, tokenizer=tok,
                             shuffle=False, process_index=0, process_count=1)
  rows = np.concatenate([b["tokens"] for b in take(truncating, 2)])
  want, kept, i = collections.Counter(), [], 0  # the same examples, one by one
  while len(kept) < 4:
    p, c = LINES[i % len(LINES)]
    out = tokenize_example({"prompt": p, "completion": c}, tok, shape="prompt_completion",
                           seq_len=6, counts=want)
    want["skipped"] += out is None
    kept += [] if out is None else [pad_example(out, 6)["tokens"]]
    i += 1
  np.testing.assert_array_equal(rows, kept)
  assert truncating.counts == want and want["skipped"] == want["no_target"] > 0
  with pytest.raises(ValueError, match="needs a tokenizer"):
    text_pipeline(path, "train", batch_size=2, seq_len=12)


def test_train_two_steps_on_jsonl(tmp_path):
  from jkd.train import default_config, make_sources, train, tokenizer_for  # noqa: PLC0415
  cfg = default_config()
  cfg.teacher.source = "random"
  cfg.teacher.model.update(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, max_position_embeddings=64)
  cfg.student.source = "random"
  cfg.student.model.num_layers = 1
  cfg.data.update(source="jsonl", path=jsonl_file(tmp_path), eval_fraction=0.34, seq_len=12,
                  batch_size=2, pack=True, cache_dir=str(tmp_path / "cache"))
  cfg.train.update(steps=2, log_every=1, progress_bar=False)
  cfg.eval.every = 2
  cfg.checkpoint.update(every=2, async_save=False)
  cfg.optimizer.warmup_steps = 1
  with pytest.raises(ValueError, match="a text dataset needs a teacher with a tokenizer"):
    tokenizer_for(cfg)
  train_src, eval_src = make_sources(cfg, 32, tokenizer=tiny_tokenizer())
  assert sorted(train_src.num_examples for train_src in (train_src, eval_src)) == [2, 4]
  again, _ = make_sources(cfg, 32, tokenizer=tiny_tokenizer())  # the cached dataset, reused
  assert len(list((tmp_path / "cache").glob("jsonl_*"))) == 1
  # Named by its file and its dataset (a hash of the contents, also in the resume fingerprint).
  assert again.name == train_src.name and again.name.startswith(f"{cfg.data.path} (jsonl_")
  out = train(cfg, str(tmp_path / "run"), train_source=train_src, eval_source=eval_src)
  assert out["status"] == "done" and out["step"] == 2
  assert np.isfinite(out["eval"]["eval/student_nll"])
  # The checkpoint's data position resumes a fresh pipeline where the run left off.
  saved = json.loads((tmp_path / "run" / "checkpoints" / "2" / "data" / "metadata").read_text())
  fresh, _ = make_sources(cfg, 32, tokenizer=tiny_tokenizer())
  fresh.set_state(saved)
  for a, b in zip(take(train_src, 3), take(fresh, 3)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="tokenizer has 24 tokens but the model's vocabulary"
                     " has 20"):
    make_sources(cfg, 20, tokenizer=tiny_tokenizer())
