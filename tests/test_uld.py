"""Cross-tokenizer distillation: ULD loss, offset alignment, cross-tokenized examples, the term."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from jkd import losses
from jkd import models
from jkd.data.tokenizers import cross_tokenize, cross_tokenize_batch
from jkd.train import step as step_lib

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- Float64 NumPy reference, from the formula. ---------------------------------------------

def ref_softmax(z, t):
  z = np.asarray(z, np.float64) / t
  m = np.max(z, axis=-1, keepdims=True)
  e = np.exp(z - m)
  return e / e.sum(-1, keepdims=True)


def ref_uld(zs, zt, *, temperature=1.0, where=None, top_k=None):
  """``T^2 sum_i |sort(q)_i - sort(p)_i|``, sorted decreasingly, padded with zeros."""
  q = -np.sort(-ref_softmax(zs, temperature), axis=-1)
  p = -np.sort(-ref_softmax(zt, temperature), axis=-1)
  if top_k is not None:
    q, p = q[..., :top_k], p[..., :top_k]
  n = max(q.shape[-1], p.shape[-1])
  out = np.zeros(q.shape[:-1])
  for idx in np.ndindex(*q.shape[:-1]):
    a, b = np.zeros(n), np.zeros(n)
    a[:q.shape[-1]], b[:p.shape[-1]] = q[idx], p[idx]
    out[idx] = np.abs(a - b).sum() * temperature ** 2
  if where is not None:
    out = np.where(where, out, 0.0)
  return out


def uld_jit(**options):
  return jit(lambda zs, zt, where: losses.uld_loss(zs, zt, where=where, **options))


# --- uld_loss. ------------------------------------------------------------------------------

@pytest.mark.parametrize("vs,vt", [(16, 24), (24, 16), (16, 16)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("top_k", [None, 5, 100])
def test_uld_matches_reference(vs, vt, temperature, top_k, rng):
  zs = (rng.standard_normal((2, 3, vs)) * 3).astype(np.float32)
  zt = (rng.standard_normal((2, 3, vt)) * 3).astype(np.float32)
  where = rng.random((2, 3)) > 0.3
  out = uld_jit(temperature=temperature, top_k=top_k)(zs, zt, where)
  assert out.shape == (2, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_uld(zs, zt, temperature=temperature, where=where,
                                          top_k=top_k), rtol=1e-5, atol=1e-6)
  assert (np.asarray(out)[~where] == 0).all()


def test_uld_properties(rng):
  z = (rng.standard_normal((4, 10)) * 2).astype(np.float32)
  perm = rng.permutation(10)
  # A permutation of the vocabulary, or extra zero-probability tokens, changes nothing.
  np.testing.assert_allclose(losses.uld_loss(z, z[:, perm]), 0.0, atol=1e-6)
  padded = np.concatenate([z, np.full((4, 5), -np.inf, np.float32)], axis=1)
  np.testing.assert_allclose(losses.uld_loss(z, padded), 0.0, atol=1e-6)
  # Bounded by 2 T^2 (disjoint one-hot distributions after sorting are never disjoint: 0).
  far = np.zeros((1, 3), np.float32); far[0, 0] = 1e4
  flat = np.zeros((1, 300), np.float32)
  v = float(losses.uld_loss(far, flat)[0])
  np.testing.assert_allclose(v, ref_uld(far, flat)[0], rtol=1e-5)
  assert 0 < v < 2


def test_uld_banned_tokens_and_masked_garbage_no_nan(rng):
  zs = (rng.standard_normal((2, 4, 8))).astype(np.float32)
  zt = (rng.standard_normal((2, 4, 12))).astype(np.float32)
  zs[0, 0, :3] = -np.inf
  zt[1, 2, 5:] = -np.inf
  where = np.ones((2, 4), bool)
  where[1, 3] = False
  zs[1, 3] = np.nan  # masked position holds garbage
  zt[1, 3] = -np.inf
  f = lambda a: jnp.sum(losses.uld_loss(a, zt, where=where))  # noqa: E731
  value, grad = jit(jax.value_and_grad(f))(zs)
  ref = ref_uld(np.where(where[..., None], zs, 0), np.where(where[..., None], zt, 0),
                where=where)
  np.testing.assert_allclose(value, ref.sum(), rtol=1e-5)
  assert np.isfinite(np.asarray(grad)).all()
  assert (np.asarray(grad)[1, 3] == 0).all()


def test_uld_check_grads_float64(rng, x64):
  zs = jnp.asarray(rng.standard_normal((3, 7)) * 2.0)
  zt = jnp.asarray(rng.standard_normal((3, 11)) * 2.0)
  for options in ({}, {"temperature": 2.0}, {"top_k": 4}):
    f = jax.jit(lambda x, o=options: losses.uld_loss(x, zt, **o))
    assert f(zs).dtype == jnp.float64
    check_grads(f, (zs,), order=1, modes=["rev"])
    np.testing.assert_allclose(f(zs), ref_uld(zs, zt, **options), rtol=1e-12)


def test_uld_bfloat16_inputs(rng):
  zs = jnp.asarray(rng.standard_normal((2, 5, 16)) * 3, jnp.bfloat16)
  zt = jnp.asarray(rng.standard_normal((2, 5, 20)) * 3, jnp.bfloat16)
  out = uld_jit()(zs, zt, None)
  assert out.dtype == jnp.float32
  ref = ref_uld(np.asarray(zs, np.float64), np.asarray(zt, np.float64))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_uld_bad_inputs():
  z = jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="positions"):
    losses.uld_loss(z, jnp.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="top_k"):
    losses.uld_loss(z, z, top_k=0)
  with pytest.raises(ValueError, match="temperature"):
    losses.uld_loss(z, z, temperature=0.0)
  with pytest.raises(TypeError, match="floating"):
    losses.uld_loss(jnp.zeros((2, 3, 5), jnp.int32), z)
  with pytest.raises(ValueError, match="where"):
    losses.uld_loss(z, z, where=jnp.ones((3, 2), bool))


# --- Alignment. -----------------------------------------------------------------------------

def test_align_by_offsets_hand_made():
  # text "héllo world": teacher ["h", "é"(2 byte tokens), "llo", " world"];
  # student ["hé", "l", "lo", " wor", "ld"], plus a BOS with an empty span.
  teacher = [(0, 1), (1, 2), (1, 2), (2, 5), (5, 11)]
  student = [(0, 0), (0, 2), (2, 3), (3, 5), (5, 9), (9, 11)]
  assert losses.align_by_offsets(teacher, student).tolist() == [-1, 2, -1, 3, -1, 4]
  # Reversed roles: the student's first byte token of "é" has not read the whole character.
  assert losses.align_by_offsets(student, teacher).tolist() == [-1, -1, 1, 3, 5]
  assert losses.align_by_offsets([], [(0, 1)]).tolist() == [-1]
  assert losses.align_by_offsets(np.array([[0, 3]]), np.zeros((0, 2))).tolist() == []
  with pytest.raises(ValueError, match="shape"):
    losses.align_by_offsets([(0, 1, 2)], [(0, 1)])
  with pytest.raises(ValueError, match="character span"):
    losses.align_by_offsets([(3, 1)], [(0, 1)])


def _wrap(tokenizer, **specials):
  return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **specials)


def word_tokenizer(words):
  t = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>", "<pad>"]
                                                                 + words)}, unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  return _wrap(t, eos_token="</s>", pad_token="<pad>")


def char_tokenizer(chars):
  t = Tokenizer(tok_models.WordLevel({c: i for i, c in enumerate(["<unk>", "</s>"]
                                                                 + list(chars))},
                                     unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  return _wrap(t, eos_token="</s>")


TEXT = "the cat sat on the mat, said 12 cats."
TEACHER = word_tokenizer(["the", "cat", "sat", "on", "mat", ",", "said", "12", "cats", "."])
STUDENT = char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 ,.")


def test_align_real_tokenizers_same_text():
  t = TEACHER(TEXT, return_offsets_mapping=True)["offset_mapping"]
  s = STUDENT(TEXT, return_offsets_mapping=True)["offset_mapping"]
  assert len(s) == len(TEXT)  # one token per character
  index = losses.align_by_offsets(t, s)
  # Independently: a student character is aligned iff a teacher word ends right after it.
  word_ends = {}
  for j, (a, b) in enumerate(t):
    word_ends[b] = j
  for i, (a, b) in enumerate(s):
    if b in word_ends:
      assert index[i] == word_ends[b] and TEXT[:b] == TEXT[:t[index[i]][1]]
    else:
      assert index[i] == -1
  aligned_chars = [TEXT[i] for i in np.flatnonzero(index >= 0)]
  assert aligned_chars == ["e", "t", "t", "n", "e", "t", ",", "d", "2", "s", "."]


def test_cross_tokenize_prompt_completion():
  ex = cross_tokenize(("the cat sat", " on the mat."), TEACHER, STUDENT, 16)
  s_ids = STUDENT("the cat sat on the mat.")["input_ids"] + [STUDENT.eos_token_id]
  assert ex["tokens"].tolist() == s_ids[:16]
  assert ex["labels"].tolist() == s_ids[1:17]
  # Labels from character 11 (" on ...") on count: label k is token k + 1.
  assert ex["loss_mask"].tolist() == [k + 1 >= 11 for k in range(16)]
  t_ids = TEACHER("the cat sat on the mat.")["input_ids"] + [TEACHER.eos_token_id]
  assert ex["teacher_tokens"].tolist() == t_ids + [TEACHER.pad_token_id] * (16 - len(t_ids))
  # Words end after characters 2, 6, 10, 13 ("the", "cat", "sat", "on"): student positions.
  expected = np.full(16, -1)
  expected[[2, 6, 10, 13]] = [0, 1, 2, 3]
  assert ex["teacher_index"].tolist() == expected.tolist()
  for k, v in ex.items():
    assert v.shape == (16,), k


def test_cross_tokenize_padding_truncation_and_errors():
  ex = cross_tokenize("the mat.", TEACHER, STUDENT, 12)
  n = len("the mat.")  # characters; + EOS = n + 1 student tokens, n labelled positions
  assert ex["labels"].tolist() == (STUDENT("the mat.")["input_ids"][1:] + [1]
                                   + [-100] * (12 - n))
  assert ex["loss_mask"].tolist() == [True] * n + [False] * (12 - n)
  assert (ex["teacher_index"][n:] == -1).all()
  assert ex["teacher_index"][[2, 6, 7]].tolist() == [0, 1, 2]  # "the", "mat", "."
  short = cross_tokenize("the cat sat on the mat.", TEACHER, STUDENT, 5)
  assert short["teacher_index"].tolist() == [-1, -1, 0, -1, -1]
  assert short["loss_mask"].all()
  tight = cross_tokenize("the cat sat on the mat.", TEACHER, STUDENT, 7)
  assert tight["teacher_index"].tolist() == [-1, -1, 0, -1, -1, -1, 1]
  batch = cross_tokenize_batch(["the mat.", ("the", " cat")], TEACHER, STUDENT, 12)
  assert batch["tokens"].shape == (2, 12) and batch["teacher_index"].dtype == np.int32
  with pytest.raises(ValueError, match="seq_len"):
    cross_tokenize("the", TEACHER, STUDENT, 0)
  with pytest.raises(ValueError, match="empty"):
    cross_tokenize(("the", ""), TEACHER, STUDENT, 4)
  with pytest.raises(ValueError, match="string"):
    cross_tokenize(3, TEACHER, STUDENT, 4)


def test_cross_tokenize_bos_before_the_first_segment_only():
  t = Tokenizer(tok_models.WordLevel({c: i for i, c in enumerate(["<unk>", "</s>", "<s>"]
                                                                 + list("the mat."))},
                                     unk_token="<unk>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
  with_bos = _wrap(t, eos_token="</s>", bos_token="<s>")
  for text, n_prompt in (("the mat.", 0), (("the", " mat."), 3)):
    ex = cross_tokenize(text, TEACHER, with_bos, 12)
    assert ex["tokens"][0] == 2 and (ex["tokens"][1:] != 2).all()
    assert ex["labels"][0] == with_bos.convert_tokens_to_ids("t")
    # The BOS position (empty span) has no aligned teacher position; "the" ends at 3.
    assert ex["teacher_index"][:4].tolist() == [-1, -1, -1, 0]
    assert ex["loss_mask"].tolist() == [k + 1 >= max(1 + n_prompt, 1) and k < 9
                                        for k in range(12)]


# --- The objective term. --------------------------------------------------------------------

def test_uld_objective_term_end_to_end(rng):
  b, ts, tt, vs, vt = 2, 6, 5, 12, 17
  zs = (rng.standard_normal((b, ts, vs)) * 2).astype(np.float32)
  zt = (rng.standard_normal((b, tt, vt)) * 2).astype(np.float32)
  index = rng.integers(-1, tt, size=(b, ts)).astype(np.int32)
  labels = rng.integers(0, vs, size=(b, ts)).astype(np.int32)
  labels[0, :2] = -100
  where = rng.random((b, ts)) > 0.2
  objective = losses.build_objective({"uld": {"temperature": 2.0, "top_k": 8},
                                      "cross_entropy": 0.5})
  total, metrics = jit(objective)({"student_logits": zs, "teacher_logits": zt,
                                   "teacher_index": index, "labels": labels, "where": where})
  gathered = np.stack([zt[i, np.maximum(index[i], 0)] for i in range(b)])
  mask = where & (labels != -100) & (index >= 0)
  per = ref_uld(zs, gathered, temperature=2.0, top_k=8)
  expected = per[mask].mean()
  np.testing.assert_allclose(metrics["loss/uld"], expected, rtol=1e-5)
  logq = np.log(ref_softmax(zs, 1.0))
  ce_mask = where & (labels != -100)
  ce = -np.mean([logq[i, j, labels[i, j]] for i, j in zip(*np.nonzero(ce_mask))])
  np.testing.assert_allclose(total, expected + 0.5 * ce, rtol=1e-5)
  # Without teacher_index the positions align one to one (same lengths).
  _, m2 = jit(losses.build_objective({"uld": 1.0}))(
      {"student_logits": zs[:, :tt], "teacher_logits": zt, "where": where[:, :tt]})
  np.testing.assert_allclose(m2["loss/uld"], ref_uld(zs[:, :tt], zt)[where[:, :tt]].mean(),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="needs the inputs"):
    losses.build_objective({"uld": 1.0})({"student_logits": zs})
  with pytest.raises(ValueError, match="did you mean 'top_k'"):
    losses.build_objective({"uld": {"topk": 3}})


def test_engine_runs_teacher_on_teacher_tokens():
  """model_inputs: the teacher reads batch['teacher_tokens'] and teacher_index reaches ULD."""
  tiny = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
  s_cfg = models.ModelConfig(vocab_size=len(STUDENT), **tiny)
  t_cfg = models.ModelConfig(vocab_size=len(TEACHER), **tiny)
  init = jit(models.init_params, static_argnums=0)  # eager init of nn.scan is slow
  s_params, t_params = init(s_cfg, jax.random.key(0)), init(t_cfg, jax.random.key(1))
  batch = cross_tokenize_batch([TEXT, ("the cat", " sat on the mat.")], TEACHER, STUDENT, 24)
  objective = losses.build_objective({"uld": 1.0, "cross_entropy": 1.0})

  @jit
  def run(s_params, t_params, batch):
    inputs, _ = step_lib.model_inputs(s_params, t_params, batch, student_config=s_cfg,
                                      teacher_config=t_cfg, objective=objective)
    t_logits = models.apply(t_params, batch["teacher_tokens"], config=t_cfg).logits
    keep = ("student_logits", "teacher_logits", "teacher_index")
    return {k: inputs[k] for k in keep}, objective(inputs)[1], t_logits

  inputs, metrics, t_logits = run(s_params, t_params, batch)
  np.testing.assert_allclose(inputs["teacher_logits"], t_logits, rtol=1e-5, atol=1e-5)
  assert inputs["student_logits"].shape == (2, 24, len(STUDENT))
  assert np.array_equal(inputs["teacher_index"], batch["teacher_index"])
  s_logits = np.asarray(inputs["student_logits"])
  gathered = np.stack([np.asarray(t_logits)[i, np.maximum(batch["teacher_index"][i], 0)]
                       for i in range(2)])
  mask = batch["loss_mask"] & (batch["teacher_index"] >= 0)
  np.testing.assert_allclose(metrics["loss/uld"], ref_uld(s_logits, gathered)[mask].mean(),
                             rtol=1e-4)
