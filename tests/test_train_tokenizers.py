"""Teacher and student tokenizers are compared when a run starts (jkd.train.build)."""

import jax
import pytest

from jkd import losses
from jkd import models
from jkd.data.model_spec import char_tokenizer
from jkd.train import build
from jkd.train.config import default_config

TINY = dict(vocab_size=128, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
            num_kv_heads=1, max_position_embeddings=32)


def _hf_dir(path, tokenizer, vocab=128):
  config = models.ModelConfig(**{**TINY, "vocab_size": vocab})
  models.save_hf(str(path), models.init_params(config, jax.random.key(0)), config,
                 tokenizer=tokenizer)
  return config


def _cfg(teacher_dir, student_dir):
  c = default_config()
  c.teacher.source, c.teacher.path = "hf", str(teacher_dir)
  c.student.source, c.student.path = "hf", str(student_dir)
  return c


def _other_tokenizer():
  tok = char_tokenizer(128)
  tok.add_special_tokens({"eos_token": "<user>"})  # Same vocabulary, another EOS.
  return tok


def test_same_tokenizer_passes_and_a_different_one_is_an_error(tmp_path):
  t = _hf_dir(tmp_path / "teacher", char_tokenizer(128))
  s = _hf_dir(tmp_path / "same", char_tokenizer(128))
  kd = losses.build_objective({"kd": {"term": "forward_kl"}})
  build.check_tokenizers(_cfg(tmp_path / "teacher", tmp_path / "same"), kd, t, s)
  _hf_dir(tmp_path / "other", _other_tokenizer())
  with pytest.raises(ValueError, match="tokenizers differ"):
    build.check_tokenizers(_cfg(tmp_path / "teacher", tmp_path / "other"), kd, t, s)
  uld = losses.build_objective({"kd": {"term": "uld"}})
  build.check_tokenizers(_cfg(tmp_path / "teacher", tmp_path / "other"), uld, t, s)


def test_vocabulary_mismatch_needs_a_cross_tokenizer_term(tmp_path):
  t = models.ModelConfig(**TINY)
  s = models.ModelConfig(**{**TINY, "vocab_size": 100})
  c = default_config()
  c.teacher.source, c.student.source = "random", "random"
  with pytest.raises(ValueError, match="teacher vocab 128 != student vocab 100.*uld"):
    build.check_tokenizers(c, losses.build_objective({"kd": {"term": "forward_kl"}}), t, s)
  build.check_tokenizers(c, losses.build_objective({"kd": {"term": "uld"}}), t, s)


def test_uld_trains_a_student_with_another_vocabulary(tmp_path):
  """End to end: a cross-tokenized batch (teacher_tokens/teacher_index), the `uld` term, and a
  student whose vocabulary differs from the teacher's; evaluation keeps student metrics only."""
  from jkd.data import cross_tokenize_batch
  from jkd.data import ArraySource
  from jkd.train import train
  from jkd.train.writer import read_metrics
  c = default_config()
  c.teacher.source = "random"
  c.teacher.model.update(dict(TINY, max_position_embeddings=64))
  c.student.source = "random"
  c.student.model.update(dict(vocab_size=110, num_layers=1))
  c.objective = {"uld": {"term": "uld", "weight": 1.0}, "ce": {"term": "cross_entropy"}}
  c.optimizer.update(dict(lr=1e-3, warmup_steps=0))
  c.train.update(dict(steps=2, log_every=1, progress_bar=False))
  c.eval.update(dict(every=2))
  c.checkpoint.update(dict(every=2, async_save=False))
  texts = [("Say hi", " hi there"), ("Count", " one two three"), ("Name a colour", " red"),
           ("Add 1 and 1", " 2")]
  ex = cross_tokenize_batch(texts, char_tokenizer(128), char_tokenizer(110), 24)
  assert (ex["teacher_index"] >= 0).any()
  result = train(c, str(tmp_path), train_source=ArraySource(ex, 4, process_index=0,
                                                            process_count=1),
                 eval_source=ArraySource(ex, 4, shuffle=False, process_index=0,
                                         process_count=1))
  assert result["step"] == 2
  history = read_metrics(str(tmp_path))
  losses_ = [r["loss/uld"] for r in history if "loss/uld" in r]
  assert len(losses_) == 2 and all(0 < v < 2.0 for v in losses_)
  assert "eval/student_nll" in result["eval"] and "eval/kl_forward" not in result["eval"]
