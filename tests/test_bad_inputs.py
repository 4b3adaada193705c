"""Bad user inputs to jkd's data readers and model loaders: each is one clear error that names the
input (file and line, array or tensor and shapes) and says the fix, never a raw decoder error."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jkd.data import arrays, corpus, jsonl, model_spec, store
from jkd.data import teacher_cache as tc
from jkd.models import gguf_io, hf
from jkd.train.sources import ddk, in_memory, rounds
from test_gguf import write_tiny_gguf

DATA = os.path.join(os.path.dirname(__file__), "data")


def _bad_utf8_file(path, lines: list[bytes]) -> str:
  with open(path, "wb") as f:
    f.write(b"\n".join(lines) + b"\n")
  return str(path)


# -------------------------------------------------------------------------------------------------
# Text files: not UTF-8, not JSON, missing fields.

_GOOD = json.dumps({"prompt": "q", "completion": "a", "domain": "d"}).encode()
_BAD = b'{"prompt": "q", "completion": "caf\xff", "domain": "d"}'  # 0xff: never UTF-8


def test_jsonl_data_that_is_not_utf8_names_file_line_and_column(tmp_path):
  path = _bad_utf8_file(tmp_path / "data.jsonl", [_GOOD, _GOOD, _BAD])
  column = _BAD.index(b"\xff") + 1
  with pytest.raises(ValueError, match=rf"data\.jsonl:3: not UTF-8 text \(byte 0xff at column"
                                       rf" {column}\); re-save the file as UTF-8"):
    jsonl.build_jsonl_dataset([path], str(tmp_path / "ds"), "bad")


def test_jsonl_bad_json_and_missing_fields_name_file_and_line(tmp_path):
  path = _bad_utf8_file(tmp_path / "data.jsonl", [_GOOD, b'{"prompt": "q",'])
  with pytest.raises(ValueError, match=r"data\.jsonl:2: invalid JSON"):
    jsonl.build_jsonl_dataset([path], str(tmp_path / "ds"), "bad")
  path = _bad_utf8_file(tmp_path / "data.jsonl", [_GOOD, b'{"prompt": "q"}'])
  with pytest.raises(ValueError, match=r"data\.jsonl:2: missing field\(s\) \['completion'\]"):
    jsonl.build_jsonl_dataset([path], str(tmp_path / "ds"), "bad")


def test_text_lines_keep_text_mode_newlines(tmp_path):
  path = tmp_path / "t.txt"
  path.write_bytes(b"a\r\nb\rc\n\nd")
  assert list(jsonl.read_text_lines(str(path))) == [(1, "a\n"), (2, "b\n"), (3, "c\n"),
                                                    (4, "\n"), (5, "d")]
  with open(path, encoding="utf-8") as f:
    assert [line for _, line in jsonl.read_text_lines(str(path))] == list(f)


@pytest.mark.parametrize("name", ["prompts.jsonl", "prompts.txt"])
def test_prompts_that_are_not_utf8(name, tmp_path):
  path = _bad_utf8_file(tmp_path / name, [b'{"prompt": "ok"}', b'{"prompt": "\xc3("}'])
  with pytest.raises(ValueError, match=rf"{re.escape(name)}:2: not UTF-8 text \(byte 0xc3 at"
                                       r" column 13\)"):
    corpus.read_prompts(path)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    corpus.read_prompts(str(tmp_path / "missing.jsonl"))


def test_ddk_domain_files_that_are_not_utf8(tmp_path):
  path = _bad_utf8_file(tmp_path / "mix.jsonl", [_GOOD, _BAD])
  with pytest.raises(ValueError, match=r"mix\.jsonl:2: not UTF-8 text \(byte 0xff"):
    ddk.split_by_domain([path], str(tmp_path / "out"))
  path = _bad_utf8_file(tmp_path / "mix.jsonl", [_GOOD, b"[1, 2]"])
  with pytest.raises(ValueError, match=r"mix\.jsonl:2: not a JSON object"):
    ddk.split_by_domain([path], str(tmp_path / "out"))


# -------------------------------------------------------------------------------------------------
# .npz token arrays.

def _npz(tmp_path, name="data.npz", **arrays_) -> str:
  path = str(tmp_path / name)
  np.savez(path, **arrays_)
  return path


def test_npz_with_mismatched_labels_is_an_error_at_load(tmp_path):
  ex = arrays.synthetic_lm_examples(4, 6, 9)
  path = _npz(tmp_path, tokens=ex["tokens"], labels=ex["labels"][:, :5])
  with pytest.raises(ValueError, match=r"data\.npz: 'labels' has shape \(4, 5\) but 'tokens' has"
                                       r" shape \(4, 6\); every \[N, T\] array"):
    in_memory.load_npz(path, vocab=9)
  path = _npz(tmp_path, **{**ex, "loss_mask": ex["loss_mask"][:3]})
  with pytest.raises(ValueError, match=r"'loss_mask' has shape \(3, 6\) but 'tokens' has shape"
                                       r" \(4, 6\)"):
    in_memory.load_npz(path, vocab=9)


@pytest.mark.parametrize("change, message", [
    (dict(labels=None), r"missing array\(s\) \['labels'\]; data.source='npz' needs"),
    (dict(tokens=np.zeros(6, np.int32), labels=np.zeros(6, np.int32)),
     r"'tokens' must be a 2-D \[N, T\] array of integer token ids; it has shape \(6,\)"),
    (dict(tokens=np.zeros((2, 3), np.float32)), r"integer token ids; .* dtype float32"),
    (dict(tokens=np.zeros((0, 3), np.int32), labels=np.zeros((0, 3), np.int32),
          loss_mask=np.zeros((0, 3), bool)), r"'tokens' is empty \(shape \(0, 3\)\)"),
    (dict(tokens=np.full((2, 3), 9)), r"token ids outside \[0, 9\) .* in 'tokens': 9 at \[0, 0\]"),
    (dict(labels=np.full((2, 3), -1)),
     r"label ids outside \[0, 9\) .* not the ignore id -100 in 'labels': -1 at \[0, 0\]"),
])
def test_npz_array_checks(change, message, tmp_path):
  ex = {k: v[:2, :3] for k, v in arrays.synthetic_lm_examples(2, 3, 9).items()}
  ex.update(change)
  path = _npz(tmp_path, **{k: v for k, v in ex.items() if v is not None})
  with pytest.raises(ValueError, match=r"data\.npz: .*" + message):
    in_memory.load_npz(path, vocab=9)


def test_npz_accepts_ignored_labels_and_names_a_missing_or_broken_file(tmp_path):
  ex = arrays.synthetic_lm_examples(2, 3, 9)
  ex["labels"] = ex["labels"].copy()
  ex["labels"][0, 0] = -100
  assert in_memory.load_npz(_npz(tmp_path, **ex), vocab=9)["labels"][0, 0] == -100
  with pytest.raises(FileNotFoundError, match=r"no \.npz file at .*nowhere\.npz"):
    in_memory.load_npz(str(tmp_path / "nowhere.npz"), vocab=9)
  path = tmp_path / "cut.npz"
  path.write_bytes(open(_npz(tmp_path, **ex), "rb").read()[:100])
  with pytest.raises(ValueError, match=r"cut\.npz: not a readable \.npz file .* truncated"):
    in_memory.load_npz(str(path), vocab=9)


def test_npz_source_checks_at_load(tmp_path):
  from jkd.train.config import default_config  # noqa: PLC0415
  from jkd.train.sources import make_sources  # noqa: PLC0415
  ex = arrays.synthetic_lm_examples(4, 6, 9)
  cfg = default_config()
  cfg.data.update(source="npz", batch_size=2,
                  path=_npz(tmp_path, tokens=ex["tokens"], labels=ex["labels"][:, 1:]))
  with pytest.raises(ValueError, match=r"'labels' has shape \(4, 5\) but 'tokens' has shape"):
    make_sources(cfg, vocab=9)


def test_pairs_npz_checks(tmp_path):
  ex = arrays.synthetic_pair_examples(4, 6, 9)
  fields = {k: ex[k] for k in ("chosen_tokens", "chosen_labels", "rejected_tokens",
                               "rejected_labels")}
  assert rounds.load_pairs(_npz(tmp_path, "p.npz", **fields), vocab=9)["chosen_tokens"].shape == (
      4, 6)
  bad = {**fields, "rejected_labels": fields["rejected_labels"][:, :4]}
  with pytest.raises(ValueError, match=r"p\.npz: 'rejected_labels' has shape \(4, 4\) but"
                                       r" 'rejected_tokens' has shape \(4, 6\)"):
    rounds.load_pairs(_npz(tmp_path, "p.npz", **bad), vocab=9)
  bad = {**fields, "rejected_tokens": fields["rejected_tokens"][:, :4],
         "rejected_labels": fields["rejected_labels"][:, :4]}
  with pytest.raises(ValueError, match=r"'chosen_tokens' has shape \(4, 6\) but"
                                       r" 'rejected_tokens' has shape \(4, 4\)"):
    rounds.load_pairs(_npz(tmp_path, "p.npz", **bad), vocab=9)
  with pytest.raises(ValueError, match=r"token ids outside \[0, 5\) .* 'chosen_tokens'"):
    rounds.load_pairs(_npz(tmp_path, "p.npz", **fields), vocab=5)


# -------------------------------------------------------------------------------------------------
# Teacher caches and stored datasets.

def test_teacher_cache_npz_and_examples_are_checked(tmp_path):
  ex = arrays.synthetic_lm_examples(2, 6, 9)
  path = _npz(tmp_path, "c.npz", **{**ex, "loss_mask": ex["loss_mask"][:, :5]})
  with pytest.raises(ValueError, match=r"c\.npz: 'loss_mask' has shape \(2, 5\) but 'tokens'"):
    tc._npz_examples(path, None, 9)
  with pytest.raises(ValueError, match=r"example 0: labels has shape \[5\], expected \[6\] \(the"
                                       r" length of its tokens\)"):
    tc._check_example(0, {**{k: v[0] for k, v in ex.items()}, "labels": ex["labels"][0, :5]},
                      None, (), 9)


def test_damaged_dataset_metadata_names_the_dataset(tmp_path):
  path = _bad_utf8_file(tmp_path / "data.jsonl", [_GOOD, _GOOD])
  ds = jsonl.build_jsonl_dataset([path], str(tmp_path / "ds"), "ok")
  with open(os.path.join(ds, "dataset_info.json"), "w") as f:
    f.write("{truncated")
  for read in (store.read_metadata, lambda p: store.open_split(p, "train"),
               lambda p: tc.check_cache(p, vocab=9)):
    with pytest.raises(ValueError, match=rf"{re.escape(ds)}: not a readable TFDS dataset .*"
                                         r"build the dataset again"):
      read(ds)


# -------------------------------------------------------------------------------------------------
# GGUF files.

def test_truncated_gguf_names_the_path(tmp_path):
  whole = open(write_tiny_gguf(tmp_path / "whole.gguf", "qwen3"), "rb").read()
  for size in (10, 1000, len(whole) // 2, len(whole) - 8):
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:size])
    for load in (gguf_io.load_gguf, gguf_io.load_tokenizer, gguf_io.read_gguf_tensors):
      with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}' is not a readable GGUF"
                                           rf" file \({size} bytes; .*\): it is truncated or"
                                           r" damaged\. Download or export it again"):
        load(str(path))
  path = tmp_path / "random.gguf"
  path.write_bytes(b"PK\x03\x04" + bytes(200))
  with pytest.raises(ValueError, match=r"random\.gguf' is not a readable GGUF file .* not a GGUF"
                                       r" file \(it starts with b'PK\\x03\\x04'"):
    gguf_io.load_gguf(str(path))


def test_missing_model_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no GGUF file at '.*nowhere\.gguf'"):
    model_spec.model_config(f"gguf:{tmp_path}/nowhere.gguf")
  with pytest.raises(FileNotFoundError, match=r"no Hugging Face model directory at '.*nowhere'"):
    model_spec.model_config(f"hf:{tmp_path}/nowhere")
  with pytest.raises(FileNotFoundError, match=r"no Hugging Face model directory at '.*nowhere'"):
    hf.load_hf(str(tmp_path / "nowhere"))
  path = tmp_path / "cut.gguf"
  path.write_bytes(open(write_tiny_gguf(tmp_path / "m.gguf", "qwen3"), "rb").read()[:1000])
  with pytest.raises(ValueError, match=r"cut\.gguf' is not a readable GGUF file"):
    model_spec.load_model(f"gguf:{path}")


# -------------------------------------------------------------------------------------------------
# Hugging Face directories.

def _copy(tmp_path, arch: str = "qwen3") -> str:
  out = str(tmp_path / f"tiny_{arch}")
  shutil.copytree(os.path.join(DATA, f"tiny_{arch}"), out)
  return out


def test_wrong_shaped_tensor_is_checked_before_conversion(tmp_path):
  out = _copy(tmp_path)
  weights = os.path.join(out, "model.safetensors")
  state = load_file(weights)
  name = "model.layers.1.self_attn.q_proj.weight"
  assert state[name].shape == (128, 64)
  state[name] = state[name][:8]
  save_file(state, weights)
  with pytest.raises(ValueError, match=(
      rf"{re.escape(weights)}: tensor '{re.escape(name)}' has shape \(8, 64\) in the checkpoint"
      r" but \(128, 64\) in the config \(\(num_heads\*head_dim, hidden_size\) with num_heads=4,"
      rf" head_dim=32, hidden_size=64, from {re.escape(out)}/config\.json\): .* Use the"
      r" config\.json saved with these weights")):
    hf.load_hf(out)


def test_wrong_shaped_gguf_tensor_names_the_gguf_tensor(tmp_path):
  path = write_tiny_gguf(tmp_path / "s.gguf", "qwen2",
                         extra={"blk.0.attn_q.bias": np.zeros(8, np.float32)})
  with pytest.raises(ValueError, match=r"s\.gguf \(GGUF tensor 'blk\.0\.attn_q\.bias'\): tensor"
                                       r" 'model\.layers\.0\.self_attn\.q_proj\.bias' has shape"
                                       r" \(8,\) in the checkpoint but \(64,\) in the config"
                                       r" \(\(num_heads\*head_dim\) .* from the GGUF metadata"):
    gguf_io.load_gguf(path)


def test_garbage_safetensors_names_the_path(tmp_path, rng):
  out = _copy(tmp_path)
  weights = os.path.join(out, "model.safetensors")
  with open(weights, "wb") as f:
    f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match=rf"{re.escape(weights)}: not a readable safetensors file"
                                       r" \(header too large\); the download may be incomplete"
                                       r" \(4096 bytes\): download it again"):
    hf.load_hf(out)
  with open(weights, "wb") as f:
    f.write(b"")
  with pytest.raises(ValueError, match=r"not a readable safetensors file \(header too small\)"):
    hf.read_safetensors(out)


def test_bad_config_json_names_the_path(tmp_path):
  out = _copy(tmp_path)
  config = os.path.join(out, "config.json")
  with open(config, "w") as f:
    f.write('{"model_type": "qwen3",')
  for load in (hf.load_hf, lambda d: model_spec.model_config(f"hf:{d}")):
    with pytest.raises(ValueError, match=rf"{re.escape(config)}: not valid JSON \(.* at line 1"
                                         r" column \d+\); the config is damaged"):
      load(out)
  with open(config, "wb") as f:
    f.write(b'{"model_type": "qwen3\xff"}')
  with pytest.raises(ValueError, match=rf"{re.escape(config)}: not UTF-8 text \(byte 0xff at"
                                       r" offset 21\)"):
    hf.load_hf(out)
  with open(config, "w") as f:
    json.dump({"model_type": "qwen3", "vocab_size": 128}, f)
  with pytest.raises(ValueError, match=rf"{re.escape(config)}: lacks 'num_attention_heads'"):
    hf.load_hf(out)
  os.remove(config)
  with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
    model_spec.model_config(f"hf:{out}")


def test_sharded_checkpoint_with_a_missing_or_bad_index(tmp_path):
  config, params = hf.load_hf(os.path.join(DATA, "tiny_qwen3"))
  out = str(tmp_path / "sharded")
  hf.save_hf(out, params, config, max_shard_bytes=100_000)
  shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
  assert len(shards) > 1
  os.remove(os.path.join(out, shards[-1]))
  with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json names weight"
                                              rf" files that are missing: \['.*{shards[-1]}'\]"):
    hf.load_hf(out)
  index = os.path.join(out, "model.safetensors.index.json")
  with open(index, "w") as f:
    f.write("{}")
  with pytest.raises(ValueError, match=rf"{re.escape(index)}: has no \"weight_map\""):
    hf.load_hf(out)


def test_damaged_tokenizer_files_name_the_directory(tmp_path):
  out = str(tmp_path / "tok")
  model_spec.char_tokenizer(128).save_pretrained(out)
  with open(os.path.join(out, "tokenizer.json"), "wb") as f:
    f.write(b"\xff\xfe not json")
  with pytest.raises(ValueError, match=rf"the tokenizer files in '{re.escape(out)}' cannot be"
                                       r" read .* download or save them again"):
    gguf_io.load_tokenizer(out)
