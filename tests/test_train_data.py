"""jkd.data.ArraySource and jkd.train.sources: deterministic per-process batches, exact resume of the position."""

from __future__ import annotations

import numpy as np
import pytest

from jkd.data import ArraySource, synthetic_lm_examples
from jkd.train.sources import make_sources


def examples(n=10, t=3):
  return {"tokens": np.arange(n * t).reshape(n, t), "labels": np.arange(n * t).reshape(n, t) + 1}


def take(source, k):
  return [next(source) for _ in range(k)]


def test_epochs_are_permutations_drawn_from_seed_and_epoch():
  src = ArraySource(examples(), batch_size=3, seed=5, process_index=0, process_count=1)
  assert src.batches_per_epoch == 3  # 10 // 3, the remainder dropped
  rows = [b["tokens"][:, 0] // 3 for b in take(src, 6)]
  for epoch in range(2):
    seen = np.concatenate(rows[3 * epoch:3 * epoch + 3])
    want = np.random.default_rng([5, epoch]).permutation(10)[:9]
    np.testing.assert_array_equal(seen, want)
  assert not np.array_equal(np.concatenate(rows[:3]), np.concatenate(rows[3:]))
  again = ArraySource(examples(), batch_size=3, seed=5, process_index=0, process_count=1)
  for a, b in zip(rows, take(again, 6)):
    np.testing.assert_array_equal(a, b["tokens"][:, 0] // 3)


def test_processes_get_disjoint_slices_of_the_global_batch():
  whole = take(ArraySource(examples(12), 4, seed=1, process_index=0, process_count=1), 5)
  parts = [take(ArraySource(examples(12), 4, seed=1, process_index=p, process_count=2), 5)
           for p in range(2)]
  for i in range(5):
    for name in ("tokens", "labels"):
      np.testing.assert_array_equal(np.concatenate([parts[0][i][name], parts[1][i][name]]),
                                    whole[i][name])


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 7])  # 3 batches per epoch: also boundaries
def test_restored_state_gives_the_same_next_batches(consumed):
  src = ArraySource(examples(), 3, seed=2, process_index=0, process_count=1)
  take(src, consumed)
  state = src.get_state()
  expected = take(src, 5)
  restored = ArraySource(examples(), 3, seed=2, process_index=0, process_count=1)
  restored.set_state(dict(state))
  for a, b in zip(expected, take(restored, 5)):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_one_epoch_is_in_order_and_leaves_the_position():
  src = ArraySource(examples(7), 2, shuffle=False, process_index=0, process_count=1)
  next(src)
  state = src.get_state()
  batches = list(src.one_epoch())
  np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches]),
                                examples(7)["tokens"][:6])
  assert src.get_state() == state


def test_errors():
  with pytest.raises(ValueError, match="same leading size"):
    ArraySource({"tokens": np.zeros((4, 2)), "labels": np.zeros((5, 2))}, 2)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    ArraySource(examples(), 4, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="exceeds the 10 examples"):
    ArraySource(examples(), 11, process_index=0, process_count=1)
  src = ArraySource(examples(), 2, seed=0, process_index=0, process_count=1)
  other = ArraySource(examples(), 2, seed=1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed=1 but this source has seed=0"):
    src.set_state(other.get_state())


def test_synthetic_examples_are_deterministic_next_token_data():
  a = synthetic_lm_examples(6, 9, 13, seed=3)
  b = synthetic_lm_examples(6, 9, 13, seed=3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a["tokens"].shape == a["labels"].shape == (6, 9) and a["loss_mask"].all()
  np.testing.assert_array_equal(a["labels"][:, :-1], a["tokens"][:, 1:])
  assert a["tokens"].min() >= 0 and a["labels"].max() < 13
  # A bigram chain with 4 successors per token: at most 4 distinct next tokens after each.
  pairs = {}
  for x, y in zip(a["tokens"].ravel(), a["labels"].ravel()):
    pairs.setdefault(x, set()).add(y)
  assert max(len(v) for v in pairs.values()) <= 4
  assert not np.array_equal(a["tokens"], synthetic_lm_examples(6, 9, 13, seed=4)["tokens"])


def data_config(**data):
  from jkd.train.config import default_config  # noqa: PLC0415
  cfg = default_config()
  cfg.data.update(data)
  return cfg


def test_config_sources(tmp_path):
  train, evals = make_sources(data_config(num_examples=12, eval_examples=5, seq_len=4,
                                          batch_size=4), vocab=9)
  assert (train.num_examples, train.batch_size, evals.num_examples, evals.batch_size) == (
      12, 4, 5, 4)
  assert not evals.shuffle and train.shuffle
  ex = synthetic_lm_examples(4, 3, 9, seed=0)
  np.savez(tmp_path / "train.npz", **ex)
  labels = ex["labels"].copy()
  labels[0, 0] = -100
  np.savez(tmp_path / "ok.npz", tokens=ex["tokens"], labels=labels)
  train, evals = make_sources(data_config(source="npz", path=str(tmp_path / "train.npz"),
                                          eval_path=str(tmp_path / "ok.npz"), batch_size=2),
                              vocab=9)
  assert train.num_examples == 4 and evals.num_examples == 4
  np.savez(tmp_path / "bad.npz", tokens=ex["tokens"] + 9, labels=ex["labels"])
  with pytest.raises(ValueError, match=r"token ids outside \[0, 9\)"):
    make_sources(data_config(source="npz", path=str(tmp_path / "bad.npz")), vocab=9)
  with pytest.raises(ValueError,
                     match=r"unknown data.source 'csv'; choose one of \[.*'jsonl', 'npz',"):
    make_sources(data_config(source="csv"), vocab=9)
