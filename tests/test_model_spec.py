"""jkd.data.model_spec: one spec string names a model everywhere; the training config's teacher
accepts it too."""

import json
import os
import shutil

import numpy as np
import pytest

from jkd.data import model_spec
from jkd.train import build
from recipe_configs import load_config

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_LLAMA = os.path.join(HERE, "data", "tiny_llama")


def test_parse_and_bad_specs():
  assert model_spec.parse_spec("smollm2") == ("smollm2", "")
  assert model_spec.parse_spec("hf:~/m") == ("hf", os.path.expanduser("~/m"))
  for bad in ("smollm3", "gguf", "smollm2:x", "hf:", "random"):
    with pytest.raises(ValueError, match="unknown model spec"):
      model_spec.parse_spec(bad)
  with pytest.raises(ValueError, match="unknown ModelConfig fields \\['widht'\\]"):
    model_spec.load_model('random:{"vocab_size": 128, "widht": 3}')
  with pytest.raises(ValueError, match="is not JSON"):
    model_spec.model_config("random:{oops")


def test_random_and_hf_specs_load_configs_params_and_tokenizers(tmp_path):
  fields = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 64}
  spec = "random:" + json.dumps({**fields, "seed": 3})
  loaded = model_spec.load_model(spec)
  assert loaded.config == model_spec.model_config(spec)
  assert loaded.config.hidden_size == 32 and len(loaded.tokenizer) == 128
  again = model_spec.load_model(spec)  # The seed makes it reproducible.
  np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]),
                                np.asarray(again.params["embed"]["embedding"]))
  with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
    model_spec.load_model(f"hf:{TINY_LLAMA}")  # The shipped tiny model has weights only.
  folder = tmp_path / "tiny_llama"
  shutil.copytree(TINY_LLAMA, folder)
  config = model_spec.model_config(f"hf:{folder}")
  model_spec.char_tokenizer(config.vocab_size).save_pretrained(str(folder))
  hf = model_spec.load_model(f"hf:{folder}")
  assert hf.config == config and len(hf.tokenizer) == config.vocab_size
  assert hf.params["embed"]["embedding"].shape[0] == config.vocab_size


def test_the_training_config_names_its_teacher_by_spec():
  cfg = load_config("kd_tiny")
  cfg.teacher.source = f"hf:{TINY_LLAMA}"
  assert build.teacher_model_spec(cfg) == f"hf:{TINY_LLAMA}"
  by_spec = build.teacher_spec(cfg).config
  cfg.teacher.source, cfg.teacher.path = "hf", TINY_LLAMA  # the same teacher, two ways
  assert build.teacher_model_spec(cfg) == f"hf:{TINY_LLAMA}"
  assert build.teacher_spec(cfg).config == by_spec
  cfg.teacher.source = "hf:"
  with pytest.raises(ValueError, match="unknown model spec 'hf:'"):
    build.teacher_spec(cfg)
  cfg.teacher.source = "gguff"
  with pytest.raises(ValueError, match="unknown teacher.source 'gguff'"):
    build.teacher_spec(cfg)
