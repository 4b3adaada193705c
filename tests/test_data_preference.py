"""jkd.data.preference: tokenized pairs, pairs by sampling and ranking, cached reference logps."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from jkd import models
from jkd.data import corpus
from jkd.data import preference as P
from jkd.data import scoring
from test_models import numpy_decoder  # the float64 NumPy decoder of the model tests

# --- A character tokenizer with a toy chat template: every id is known in advance. ------------
PAD, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3, 4
CHARS = "abcdefghijklmnopqrstuvwxyz ?"


def char_ids(text):
  return [5 + CHARS.index(c) for c in text]


class CharTokenizer:
  eos_token_id, pad_token_id, chat_template = EOS, PAD, "user-turn + assistant prompt"

  def __call__(self, text, add_special_tokens=True):
    return {"input_ids": ([BOS] if add_special_tokens else []) + char_ids(text)}

  def apply_chat_template(self, messages, add_generation_prompt, tokenize):
    assert add_generation_prompt and tokenize and len(messages) == 1
    return {"input_ids": [USER] + char_ids(messages[0]["content"]) + [EOS, ASSISTANT]}

  def decode(self, ids, skip_special_tokens=True):
    return "".join(CHARS[i - 5] for i in ids if i >= 5)


TOK = CharTokenizer()
A, B, C, D = char_ids("abcd")
X = -100


@functools.lru_cache(maxsize=None)
def tiny(vocab=128, seed=0):
  """A tiny random decoder: NumPy weights of the init's shapes (no init compilation), norms
  ``1 + noise``, other weights ``0.3 * normal`` (log-probs far from uniform)."""
  cfg = models.ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
  shapes = jax.eval_shape(functools.partial(models.init_params, cfg), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = 0.3 * rng.standard_normal(leaf.shape)
    return (noise + ("scale" in jax.tree_util.keystr(path))).astype(np.float32)
  return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


# ------------------------------------------------------------------------------------------------
# 1. Tokenized pairs


def test_tokenize_preference_layout():
  out = P.tokenize_preference({"prompt": "ab", "chosen": "c", "rejected": "dd"}, TOK, seq_len=9)
  assert {k: v.dtype for k, v in out.items()} == {k: np.int32 for k in P.TOKEN_FIELDS}
  prompt = [USER, A, B, EOS, ASSISTANT]
  assert out["chosen_tokens"].tolist() == prompt + [C, EOS, PAD, PAD]
  assert out["chosen_labels"].tolist() == [X, X, X, X, C, EOS, X, X, X]
  assert out["rejected_tokens"].tolist() == prompt + [D, D, EOS, PAD]
  assert out["rejected_labels"].tolist() == [X, X, X, X, D, D, EOS, X, X]
  # Without the chat template: the plain text with the tokenizer's special tokens (BOS).
  plain = P.tokenize_preference({"prompt": "ab", "chosen": "c", "rejected": "d"}, TOK,
                                seq_len=6, chat_template=False)
  assert plain["chosen_tokens"].tolist() == [BOS, A, B, C, EOS, PAD]
  assert plain["chosen_labels"].tolist() == [X, X, C, EOS, X, X]
  # bytes (as TFDS returns text) are decoded.
  same = P.tokenize_preference({"prompt": b"ab", "chosen": b"c", "rejected": b"dd"}, TOK,
                               seq_len=9)
  assert all((same[k] == out[k]).all() for k in P.TOKEN_FIELDS)


@pytest.mark.parametrize("example, seq_len, match", [
    ({"prompt": "ab", "chosen": "", "rejected": "c"}, 9, "chosen completion is empty"),
    ({"prompt": "ab", "chosen": "c", "rejected": "  "}, 9, "rejected completion is empty"),
    ({"prompt": "ab", "chosen": "c", "rejected": "c"}, 9, "no preference signal"),
    ({"prompt": "abcd", "chosen": "c", "rejected": "d"}, 7, "prompt is 7 tokens but seq_len"),
    ({"prompt": "ab", "chosen": "c"}, 9, "'rejected' is missing"),
    ({"prompt": "ab", "chosen": 3, "rejected": "c"}, 9, "'chosen' must be text"),
])
def test_tokenize_preference_errors(example, seq_len, match):
  with pytest.raises(ValueError, match=match):
    P.tokenize_preference(example, TOK, seq_len=seq_len)


def test_tokenize_preference_overflow():
  ex = {"prompt": "ab", "chosen": "abc", "rejected": "d"}  # chosen: 5 + 4 = 9 tokens
  cut = P.tokenize_preference(ex, TOK, seq_len=7)
  assert cut["chosen_tokens"].tolist() == [USER, A, B, EOS, ASSISTANT, A, B]  # EOS cut
  assert cut["chosen_labels"].tolist() == [X, X, X, X, A, B, X]
  assert cut["rejected_tokens"].tolist() == [USER, A, B, EOS, ASSISTANT, D, EOS]
  assert P.tokenize_preference(ex, TOK, seq_len=7, overflow="drop") is None
  with pytest.raises(ValueError, match="needs 9 tokens .* > seq_len 7"):
    P.tokenize_preference(ex, TOK, seq_len=7, overflow="error")
  with pytest.raises(ValueError, match="identical in their first 2 tokens"):
    P.tokenize_preference({"prompt": "ab", "chosen": "cda", "rejected": "cdb"}, TOK, seq_len=7)
  with pytest.raises(ValueError, match="overflow must be one of"):
    P.tokenize_preference(ex, TOK, seq_len=9, overflow="cut")


def test_tokenize_pairs_stacks_and_names_the_bad_example():
  good = {"prompt": "ab", "chosen": "c", "rejected": "d"}
  long = {"prompt": "ab", "chosen": "abcd", "rejected": "d"}
  out = P.tokenize_pairs([good, long, good], TOK, seq_len=8, overflow="drop")
  assert out["chosen_tokens"].shape == (2, 8) and out["example_index"].tolist() == [0, 2]
  with pytest.raises(ValueError, match=r"^pairs.jsonl:2: chosen == rejected"):
    P.tokenize_pairs([good, dict(good, rejected="c")], TOK, seq_len=8, source="pairs.jsonl")
  with pytest.raises(ValueError, match="every pair was dropped"):
    P.tokenize_pairs([long], TOK, seq_len=8, overflow="drop")


# ------------------------------------------------------------------------------------------------
# 3. Reference log-probs


def numpy_completion_logprobs(params, cfg, tokens, labels):
  """float64 ``[N]`` sums of log softmax(logits)[label] over the labelled positions."""
  out = []
  for tok, lab in zip(tokens, labels):
    z = numpy_decoder(params, cfg, np.asarray(tok))[0]
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    pos = np.flatnonzero(lab != -100)
    out.append(logp[pos, lab[pos]].sum())
  return np.asarray(out)


def random_pairs(rng, n, seq_len, vocab):
  """Tokenized pairs: random prompt/completion lengths, labels = next tokens on completions."""
  out = {k: [] for k in P.TOKEN_FIELDS}
  for _ in range(n):
    p = rng.integers(1, seq_len // 2)
    for side in ("chosen", "rejected"):
      c = rng.integers(1, seq_len - p + 1)
      ids = rng.integers(0, vocab, p + c)
      tokens, labels = np.zeros(seq_len, np.int32), np.full(seq_len, -100, np.int32)
      tokens[:p + c] = ids
      labels[p - 1:p + c - 1] = ids[p:]
      out[f"{side}_tokens"].append(tokens)
      out[f"{side}_labels"].append(labels)
  return {k: np.stack(v) for k, v in out.items()}


@pytest.fixture
def count_forwards(monkeypatch):
  calls = []
  real = scoring._forward  # pylint: disable=protected-access

  def counted(*args, **kwargs):
    calls.append(args[1].shape)
    return real(*args, **kwargs)
  monkeypatch.setattr(scoring, "_forward", counted)
  return calls


def test_reference_logprobs_against_numpy_and_cached(rng, tmp_path, count_forwards):
  cfg, params = tiny()
  data = random_pairs(rng, 5, 12, cfg.vocab_size)
  ref = P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path, batch_size=2)
  assert len(count_forwards) == 3  # 5 pairs in batches of 2 (chosen and rejected together)
  for side in ("chosen", "rejected"):
    got = ref[f"reference_{side}_logps"]
    assert got.dtype == np.float32 and got.shape == (5,)
    want = numpy_completion_logprobs(params, cfg, data[f"{side}_tokens"], data[f"{side}_labels"])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Same model, same data: loaded from the cache, no forward.
  again = P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path, batch_size=4)
  assert len(count_forwards) == 3
  assert all((again[k] == ref[k]).all() for k in ref)
  fp = P.reference_fingerprint(data, params=params, config=cfg)
  assert os.listdir(tmp_path) == [fp]
  assert os.listdir(tmp_path / fp) == [P.CACHE_FILE]  # no temporary file left behind
  # One parameter value changed: a new fingerprint and a recompute.
  changed = jax.tree.map(np.copy, params)
  changed["final_norm"]["scale"][3] += 1e-3
  P.reference_logprobs(data, params=changed, config=cfg, cache_dir=tmp_path, batch_size=2)
  assert len(count_forwards) == 6
  # One label of the data changed: a new fingerprint and a recompute.
  data2 = {k: v.copy() for k, v in data.items()}
  pos = np.flatnonzero(data2["rejected_labels"][4] != -100)[0]
  data2["rejected_labels"][4, pos] = (data2["rejected_labels"][4, pos] + 1) % cfg.vocab_size
  ref2 = P.reference_logprobs(data2, params=params, config=cfg, cache_dir=tmp_path, batch_size=2)
  assert len(count_forwards) == 9 and len(os.listdir(tmp_path)) == 3
  assert (ref2["reference_chosen_logps"] == ref["reference_chosen_logps"]).all()
  assert ref2["reference_rejected_logps"][4] != ref["reference_rejected_logps"][4]
  # A change of config alone (same parameters) is also a new fingerprint.
  assert P.reference_fingerprint(data, params=params, config=cfg.replace(rms_norm_eps=1e-6)) != fp


def test_reference_logprobs_corrupted_cache_is_an_error(rng, tmp_path, count_forwards):
  cfg, params = tiny()
  data = random_pairs(rng, 2, 12, cfg.vocab_size)  # the shapes of the test above: no compile
  P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path)
  path = tmp_path / P.reference_fingerprint(data, params=params, config=cfg) / P.CACHE_FILE
  good = path.read_bytes()
  for bad in (good[:len(good) // 2], b"not a zip file"):
    path.write_bytes(bad)
    with pytest.raises(ValueError, match=f"cache {path} is corrupted.*delete"):
      P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path)
  # Well-formed but wrong content (values of another data set) is caught as well.
  np.savez(path, fingerprint=np.asarray("0" * 64), format_version=np.asarray(1),
           reference_chosen_logps=np.zeros(2, np.float32),
           reference_rejected_logps=np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="fingerprint that is not its directory's"):
    P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path)
  assert len(count_forwards) == 1


def test_reference_logprobs_bad_input(tmp_path):
  cfg, params = tiny()
  data = random_pairs(np.random.default_rng(0), 2, 8, cfg.vocab_size)
  data["chosen_labels"][1] = -100
  with pytest.raises(ValueError, match=r"pairs \[1\] have no chosen completion label"):
    P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path)
  data = random_pairs(np.random.default_rng(0), 2, 8, 1000)
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    P.reference_logprobs(data, params=params, config=cfg, cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# 2. Scorers and pairs


def test_teacher_logprob_scorer_against_numpy(rng):
  cfg, params = tiny(seed=3)
  cands = [scoring.Candidate("", rng.integers(0, 128, p), "", rng.integers(0, 128, c), {})
           for p, c in ((3, 5), (1, 1), (7, 2))]
  got = scoring.make_scorer("teacher_logprob", params=params, config=cfg, bucket=12)(cands)
  for cand, value in zip(cands, got):
    tokens, labels = scoring.sequence_layout(cand.prompt_ids, cand.completion_ids, 16, 0)
    total = numpy_completion_logprobs(params, cfg, tokens[None], labels[None])[0]
    np.testing.assert_allclose(value, total / len(cand.completion_ids), rtol=2e-5)


def reward_chars(prompt, completion):
  """A reward for the reward_fn test: the completion's number of 'a' characters."""
  return float(completion.count("a"))


def test_reward_fn_and_exact_match_scorers():
  cands = [scoring.Candidate("q", np.array([1]), text, np.array([5]), {"answer": "Blue."})
           for text in ("aab", "blue", " BLUE! ", "red")]
  reward = scoring.make_scorer("reward_fn", fn=f"{__name__}:reward_chars")
  assert reward(cands).tolist() == [2.0, 0.0, 0.0, 0.0]
  assert scoring.make_scorer("exact_match")(cands).tolist() == [0.0, 1.0, 1.0, 0.0]
  assert scoring.make_scorer("exact_match", normalize=False)(cands).tolist() == [0.0] * 4
  with pytest.raises(ValueError, match="answer field 'ref'"):
    scoring.make_scorer("exact_match", field="ref")(cands)
  for name, match in (("no_colon", "module.path:function"),
                      ("jkd_no_such_module:f", "cannot import module"),
                      ("os.path:no_such_fn", "no callable 'no_such_fn'")):
    with pytest.raises(ValueError, match=match):
      scoring.make_scorer("reward_fn", fn=name)
  with pytest.raises(ValueError, match="returned 'x'"):
    scoring.make_scorer("reward_fn", fn=lambda p, c: "x")(cands)
  with pytest.raises(ValueError, match=r"unknown scorer 'lenght'.*did you mean \['length'\]"):
    scoring.make_scorer("lenght")


def test_make_pairs_length_scorer():
  cfg, params = tiny(vocab=len(CHARS) + 3, seed=2)  # the CLI test's model: shared compilation
  params = {**params, "embed": {"embedding": params["embed"]["embedding"] * np.where(
      np.arange(cfg.vocab_size) == 1, 2.0, 1.0)[:, None].astype(np.float32)}}  # EOS (1) likelier
  seen = []

  def recording_length(cands):
    seen.extend(cands)
    return scoring.make_scorer("length")(cands)

  decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
  prompts = [[2, 3], {"prompt": [4], "domain": "toy"}, [5, 5, 2], [3]]
  kw = dict(policy=(params, cfg), n=4, max_new_tokens=6, decode=decode, eos_id=1,
            batch_size=8, seed=7)
  pairs = P.make_pairs(prompts, scorer=recording_length, **kw)
  assert len(seen) == 16 and pairs.num_prompts == 4
  expected, skipped = [], []
  for i in range(4):
    group = [c for c in seen[4 * i:4 * i + 4] if c.completion.strip()]
    assert all(c.prompt == decode(np.ravel(prompts[i]["prompt"] if i == 1 else prompts[i]))
               for c in group)
    lengths = [len(c.completion_ids) for c in group]
    if len(group) < 2 or min(lengths) == max(lengths):
      skipped.append(i)
      continue
    expected.append({"prompt": group[0].prompt,
                     "chosen": group[int(np.argmax(lengths))].completion,
                     "rejected": group[int(np.argmin(lengths))].completion,
                     "chosen_score": float(max(lengths)), "rejected_score": float(min(lengths)),
                     "domain": "toy" if i == 1 else ""})
  assert list(pairs) == expected and pairs.skipped == skipped and len(expected) >= 2
  # The stop token is sampled, counted by the scorer, and kept out of the text.
  assert any(c.completion_ids[-1] == 1 and "1" not in c.completion.split() for c in seen)
  # Same seed and round: the same pairs; another round: fresh samples.
  assert list(P.make_pairs(prompts, scorer="length", **kw)) == expected
  again = P.make_pairs(prompts, scorer=recording_length, round_index=1, **kw)
  assert [c.completion for c in seen[16:]] != [c.completion for c in seen[:16]]
  assert again.num_prompts == 4
  # Scores that never differ: every prompt is skipped, none paired.
  flat = P.make_pairs(prompts, scorer=lambda cands: np.zeros(len(cands)), **kw)
  assert list(flat) == [] and flat.skipped == [0, 1, 2, 3]
  with pytest.raises(ValueError, match="8 finite scores"):
    P.make_pairs(prompts[:2], scorer=lambda cands: np.full(len(cands), np.nan), **kw)
  with pytest.raises(ValueError, match="n must be an int >= 2"):
    P.make_pairs(prompts, scorer="length", **dict(kw, n=1))


def test_write_and_read_pairs(tmp_path):
  pairs = [{"prompt": "ab", "chosen": "c", "rejected": "dd", "chosen_score": 2.0,
            "rejected_score": -1.5, "domain": "toy"},
           {"prompt": "ba", "chosen": "ab", "rejected": "b"}]
  path = P.write_pairs(pairs, str(tmp_path), "pairs", metadata={"round": 3})
  back = P.read_pairs(path)
  assert back[0] == pairs[0]
  assert back[1]["chosen"] == "ab" and np.isnan(back[1]["chosen_score"])
  meta = json.loads(json.dumps(P.store.read_metadata(path)))
  assert meta["shape"] == "preference" and meta["num_pairs"] == 2 and meta["round"] == 3
  out = P.tokenize_pairs(back, TOK, seq_len=9)
  assert out["rejected_tokens"][0].tolist() == [USER, A, B, EOS, ASSISTANT, D, D, EOS, PAD]
  with pytest.raises(ValueError, match="no pairs to write"):
    P.write_pairs([], str(tmp_path), "empty")


def test_prompt_files_keep_their_fields_for_scorers(tmp_path):
  # make_pairs reads its prompts with jkd.data.corpus.read_prompts(keep=True): a JSONL record's
  # other fields (a reference answer) reach the scorer; a text file is one prompt a line.
  good = tmp_path / "p.jsonl"
  good.write_text('{"prompt": "hi", "answer": "x"}\n\n{"prompt": "yo"}\n')
  assert corpus.read_prompts(str(good), keep=True) == [
      {"id": "1", "prompt": "hi", "domain": "", "answer": "x"},
      {"id": "3", "prompt": "yo", "domain": ""}]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "hi"}\n{"question": "yo"}\n')
  with pytest.raises(ValueError, match=f"{bad}:2: 'prompt' must be a non-empty string"):
    corpus.read_prompts(str(bad), keep=True)
  bad.write_text('{"prompt": "hi"}\n{"prompt": \n')
  with pytest.raises(ValueError, match=f"{bad}:2: not valid JSON"):
    corpus.read_prompts(str(bad), keep=True)
  txt = tmp_path / "p.txt"
  txt.write_text("one\n\ntwo\n")
  assert [r["prompt"] for r in corpus.read_prompts(str(txt))] == ["one", "two"]


def char_hf_tokenizer():
  """A real ``transformers`` tokenizer, one token per character (ids: pad 0, EOS 1)."""
  from tokenizers import Tokenizer, decoders
  from tokenizers import models as tokenizer_models
  from transformers import PreTrainedTokenizerFast
  vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
  backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
  backend.decoder = decoders.Fuse()
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")


def test_cli_make(tmp_path, capsys):
  cfg, params = tiny(vocab=len(CHARS) + 3, seed=2)
  model_dir = str(tmp_path / "model")
  models.save_hf(model_dir, params, cfg, tokenizer=char_hf_tokenizer())
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("ab?\nhello\n")
  common = ["make", "--policy", f"hf:{model_dir}", "--prompts", str(prompts), "--n", "4",
            "--max-new-tokens", "6", "--out", str(tmp_path / "out"), "--no-chat-template"]
  with pytest.raises(SystemExit):
    P.main(common + ["--scorer", "teacher_logprob"])  # no --teacher
  assert "needs --teacher" in capsys.readouterr().err
  assert P.main(common + ["--scorer", "teacher_logprob", "--teacher", f"hf:{model_dir}",
                          "--round", "2"]) == 0
  path = str(tmp_path / "out" / "pairs_round2")
  pairs = P.read_pairs(path)
  assert f"{len(pairs)} pairs from 2 prompts" in capsys.readouterr().out and pairs
  assert all(p["prompt"] in ("ab?", "hello") and p["chosen_score"] > p["rejected_score"]
             for p in pairs)
  meta = P.store.read_metadata(path)
  assert meta["round"] == 2 and meta["scorer"] == "teacher_logprob"


# ------------------------------------------------------------------------------------------------
# The real SmolLM2 teacher


@pytest.mark.slow
def test_smollm2_pairs_ranked_by_the_teacher(tmp_path):
  """Distillation-DPO's loop on SmolLM2: a 2-layer student samples, the teacher ranks."""
  path = models.smollm2_gguf_path()
  config, teacher = models.load_gguf(path)
  tokenizer = models.load_tokenizer(path)
  s_config, student = models.student_from_teacher(teacher, config, every=15)  # 2 layers
  prompts = ["What is 2+2?", "Name a colour."]
  pairs = P.make_pairs(prompts, policy=(student, s_config), tokenizer=tokenizer,
                       scorer="teacher_logprob",
                       scorer_options={"params": teacher, "config": config},
                       n=2, max_new_tokens=8, batch_size=4)
  assert len(pairs) + len(pairs.skipped) == 2 and pairs
  # The scores are the teacher's mean log-likelihoods of the completions (EOS included when
  # sampled), so chosen > rejected; both pairs go through tokenization and the reference cache.
  for pair in pairs:
    assert pair["chosen_score"] > pair["rejected_score"] and pair["prompt"] in prompts
  tokenized = P.tokenize_pairs(pairs, tokenizer, seq_len=64)
  prompt_ids = P.encode_prompt(tokenizer, pairs[0]["prompt"])
  assert prompt_ids == tokenizer.apply_chat_template(
      [{"role": "user", "content": pairs[0]["prompt"]}], add_generation_prompt=True)["input_ids"]
  assert tokenized["chosen_tokens"][0, :len(prompt_ids)].tolist() == prompt_ids
  ref = P.reference_logprobs(tokenized, params=teacher, config=config, cache_dir=tmp_path)
  assert np.isfinite(ref["reference_chosen_logps"]).all()
  assert (ref["reference_chosen_logps"] < 0).all()
