"""Hugging Face checkpoints: read ``config.json`` + safetensors (no PyTorch), write them back.

Weights are converted between Hugging Face's per-layer ``nn.Linear`` layout (``[out, in]``) and
jkd's stacked, per-head Flax layout (``[layers, in, heads, head_dim]``), and placed straight into
the target sharding (one ``jax.device_put`` per parameter, from host memory).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jkd.models.config import ModelConfig
from jkd.models import transformer

PyTree = Any


def _per_layer(config: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable]]:
  """jkd path (under ``layers``) -> (HF name in layer i, HF->jkd, jkd->HF) for one layer."""
  h, d, nh, nkv = config.hidden_size, config.dim_per_head, config.num_heads, config.num_kv_heads
  heads = lambda n: (lambda w: w.T.reshape(h, n, d), lambda w: w.reshape(h, n * d).T)  # noqa
  bias = lambda n: (lambda b: b.reshape(n, d), lambda b: b.reshape(n * d))  # noqa: E731
  same = (lambda w: w, lambda w: w)
  table = {
      ("attn", "q", "kernel"): ("self_attn.q_proj.weight",) + heads(nh),
      ("attn", "k", "kernel"): ("self_attn.k_proj.weight",) + heads(nkv),
      ("attn", "v", "kernel"): ("self_attn.v_proj.weight",) + heads(nkv),
      ("attn", "o", "kernel"): ("self_attn.o_proj.weight", lambda w: w.T.reshape(nh, d, h),
                                lambda w: w.reshape(nh * d, h).T),
      ("attn_norm", "scale"): ("input_layernorm.weight",) + same,
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight",) + same,
  }
  if config.qkv_bias:
    table[("attn", "q", "bias")] = ("self_attn.q_proj.bias",) + bias(nh)
    table[("attn", "k", "bias")] = ("self_attn.k_proj.bias",) + bias(nkv)
    table[("attn", "v", "bias")] = ("self_attn.v_proj.bias",) + bias(nkv)
  if config.qk_norm:
    table[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight",) + same
    table[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight",) + same
  if config.num_experts:
    table[("moe", "router", "kernel")] = ("block_sparse_moe.gate.weight", lambda w: w.T,
                                          lambda w: w.T)
  else:
    t = (lambda w: w.T, lambda w: w.T)
    table[("mlp", "gate", "kernel")] = ("mlp.gate_proj.weight",) + t
    table[("mlp", "up", "kernel")] = ("mlp.up_proj.weight",) + t
    table[("mlp", "down", "kernel")] = ("mlp.down_proj.weight",) + t
  return table


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


#: Hugging Face tensor name (after ``model.layers.N.`` for a layer's) -> its shape, in
#: :class:`ModelConfig` fields (``a*b`` is a product).
_HF_SHAPES: dict[str, tuple[str, ...]] = {
    "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
    "model.norm.weight": ("hidden_size",),
    "lm_head.weight": ("vocab_size", "hidden_size"),
    "self_attn.q_proj.weight": ("num_heads*head_dim", "hidden_size"),
    "self_attn.k_proj.weight": ("num_kv_heads*head_dim", "hidden_size"),
    "self_attn.v_proj.weight": ("num_kv_heads*head_dim", "hidden_size"),
    "self_attn.o_proj.weight": ("hidden_size", "num_heads*head_dim"),
    "self_attn.q_proj.bias": ("num_heads*head_dim",),
    "self_attn.k_proj.bias": ("num_kv_heads*head_dim",),
    "self_attn.v_proj.bias": ("num_kv_heads*head_dim",),
    "self_attn.q_norm.weight": ("head_dim",),
    "self_attn.k_norm.weight": ("head_dim",),
    "input_layernorm.weight": ("hidden_size",),
    "post_attention_layernorm.weight": ("hidden_size",),
    "mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
    "block_sparse_moe.gate.weight": ("num_experts", "hidden_size"),
    "w1.weight": ("intermediate_size", "hidden_size"),
    "w3.weight": ("intermediate_size", "hidden_size"),
    "w2.weight": ("hidden_size", "intermediate_size"),
}


def _expected_shape(name: str, config: ModelConfig) -> tuple[tuple[int, ...], str] | None:
  """``(shape, "(fields) with field=value, ...")`` that ``config`` implies for a tensor."""
  key = next((k for k in _HF_SHAPES if name == k or name.endswith("." + k)), None)
  if key is None:
    return None
  fields = _HF_SHAPES[key]
  values = {"head_dim": config.dim_per_head}
  shape = []
  for dim in fields:
    size = 1
    for field in dim.split("*"):
      values.setdefault(field, getattr(config, field))
      size *= int(values[field])
    shape.append(size)
  used = ", ".join(f"{f}={values[f]}" for f in dict.fromkeys(
      f for dim in fields for f in dim.split("*")))
  return tuple(shape), f"({', '.join(fields)}) with {used}"


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig,
                           *, dtype: Any = None, checkpoint: str = "checkpoint",
                           files: Mapping[str, str] | None = None,
                           config_source: str = "") -> PyTree:
  """Host (NumPy) jkd parameters from a Hugging Face state dict of NumPy arrays.

  Every tensor's shape is checked against the one ``config`` implies before it is converted.

  Args:
    state: ``{Hugging Face name: array}``.
    config: the model's config.
    dtype: the parameters' dtype (default ``config.param_dtype``).
    checkpoint: what ``state`` was read from (a directory or file), named in errors.
    files: where each tensor was read (e.g. its safetensors file), named in errors.
    config_source: where ``config`` came from (e.g. the ``config.json`` path), named in errors.

  Raises:
    ValueError: a tensor missing, or of a shape that does not match ``config`` (the message
      names the file, the tensor, both shapes and the config fields that imply the expected
      one).
  """
  dtype = jnp.dtype(dtype or config.param_dtype)
  expected = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  files = files or {}

  def take(name: str) -> np.ndarray:
    if name not in state:
      near = [k for k in state if k.split(".")[-2:] == name.split(".")[-2:]][:3]
      raise ValueError(f"{checkpoint} has no tensor {name!r}" + (f" (it has e.g. {near})"
                                                                   if near else "")
                       + f"; is it a {config.architecture} model with {config.num_layers} layers?")
    value = np.asarray(state[name], np.float32)
    want = _expected_shape(name, config)
    if want is not None and value.shape != want[0]:
      source = f", from {config_source}" if config_source else ""
      raise ValueError(f"{files.get(name, checkpoint)}: tensor {name!r} has shape {value.shape}"
                       f" in the checkpoint but {want[0]} in the config ({want[1]}{source}):"
                       " the weights and the config belong to different models. Use the"
                       " config.json saved with these weights, or download or export the"
                       " checkpoint again.")
    return value

  params: dict = {}
  _set(params, ("embed", "embedding"), take("model.embed_tokens.weight"))
  _set(params, ("final_norm", "scale"), take("model.norm.weight"))
  if not config.tie_embeddings:
    _set(params, ("lm_head",), take("lm_head.weight").T)
  for path, (name, to_jkd, _) in _per_layer(config).items():
    _set(params, ("layers",) + path, np.stack(
        [to_jkd(take(f"model.layers.{i}.{name}")) for i in range(config.num_layers)]))
  if config.num_experts:
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
      _set(params, ("layers", "moe", ours), np.stack([np.stack(
          [take(f"model.layers.{i}.block_sparse_moe.experts.{e}.{theirs}.weight").T
           for e in range(config.num_experts)]) for i in range(config.num_layers)]))

  def check(path, struct):
    keys = tuple(getattr(p, "key", p) for p in path)
    shape = struct.shape
    got = _get(params, keys).shape
    if got != tuple(shape):
      raise ValueError(f"parameter {'/'.join(keys)} has shape {got} in the checkpoint but"
                       f" {tuple(shape)} in the config: the checkpoint belongs to another model"
                       " shape.")

  jax.tree_util.tree_map_with_path(check, expected)
  return jax.tree.map(lambda x: x.astype(dtype), params)


def params_to_state_dict(params: PyTree, config: ModelConfig) -> dict[str, np.ndarray]:
  """A Hugging Face state dict (NumPy float32) from jkd parameters (dense models)."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
  state = {"model.embed_tokens.weight": host["embed"]["embedding"],
           "model.norm.weight": host["final_norm"]["scale"]}
  if not config.tie_embeddings:
    state["lm_head.weight"] = np.ascontiguousarray(host["lm_head"].T)
  for path, (name, _, to_hf) in _per_layer(config).items():
    stacked = _get(host["layers"], path)
    for i in range(config.num_layers):
      state[f"model.layers.{i}.{name}"] = np.ascontiguousarray(to_hf(stacked[i]))
  return state


def _read_json(path: str, what: str) -> Any:
  """A JSON file of a checkpoint; an unreadable one is a ValueError naming it."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start});"
                     f" the {what} is damaged: download or save it again.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno});"
                     f" the {what} is damaged: download or save it again.") from None


def _check_directory(directory: str) -> str:
  directory = os.path.expanduser(os.fspath(directory))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no Hugging Face model directory at {directory!r}; check the path"
                            " (it must hold config.json and the safetensors weights).")
  return directory


def _safetensors_files(directory: str) -> list[str]:
  """The weight files of a directory (those its index names, or ``model.safetensors``)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(index):
    weight_map = _read_json(index, "checkpoint index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: has no \"weight_map\" of tensor names to files; the index is"
                       " damaged: download or save it again.")
    files = [os.path.join(directory, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise FileNotFoundError(f"{index} names weight files that are missing: {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}; the download is incomplete:"
                              " download the missing shards.")
    return files
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in"
                          f" {directory!r} (PyTorch .bin checkpoints are not read: convert"
                          " them to safetensors).")


def _read_safetensors(directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(state, {tensor name: its file})`` of a Hugging Face directory."""
  from safetensors.numpy import load_file
  state: dict[str, np.ndarray] = {}
  files: dict[str, str] = {}
  for path in _safetensors_files(_check_directory(directory)):
    tensors = _load_any_dtype(path, load_file)
    state.update(tensors)
    files.update(dict.fromkeys(tensors, path))
  return state, files


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a Hugging Face directory: ``model.safetensors`` or a sharded index.

  Raises:
    FileNotFoundError: no directory, no weights, or a shard the index names is missing.
    ValueError: a damaged index or weight file (the message names it).
  """
  return _read_safetensors(directory)[0]


def _load_any_dtype(path, load_file):
  from safetensors import SafetensorError
  try:
    try:
      return load_file(path)
    except (TypeError, ValueError):  # bf16 tensors: NumPy has no bfloat16, read raw through JAX.
      from safetensors import safe_open
      out = {}
      with safe_open(path, framework="flax") as f:
        for k in f.keys():
          out[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
      return out
  except SafetensorError as e:
    reason = str(e).removeprefix("Error while deserializing header: ")
    raise ValueError(f"{path}: not a readable safetensors file ({reason}); the download may be"
                     f" incomplete ({os.path.getsize(path)} bytes): download it again.") from None


def load_config(directory: str, **config_overrides) -> ModelConfig:
  """The :class:`ModelConfig` of a Hugging Face model directory's ``config.json``.

  Raises:
    FileNotFoundError: no directory, or no ``config.json`` in it.
    ValueError: a ``config.json`` that is not JSON, or that jkd cannot read (the message names
      it).
  """
  directory = _check_directory(directory)
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory!r} has no config.json: not a Hugging Face model"
                            " directory.")
  raw = _read_json(path, "config")
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: must hold a JSON object of the model's hyper-parameters, not a"
                     f" {type(raw).__name__}.")
  try:
    return ModelConfig.from_hf(raw, **config_overrides)
  except KeyError as e:
    raise ValueError(f"{path}: lacks {e.args[0]!r}, which jkd needs to build the model; the file"
                     " is damaged or not a decoder's config: download it again.") from None
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def load_hf(directory: str, *, shardings: PyTree | None = None,
            **config_overrides) -> tuple[ModelConfig, PyTree]:
  """Loads ``config.json`` + safetensors from a Hugging Face model directory.

  Args:
    directory: a local directory (as saved by ``save_pretrained`` or downloaded from the Hub).
    shardings: optional pytree of ``jax.sharding.Sharding`` matching the parameters; each
      tensor is put straight into its sharding.
    **config_overrides: :class:`ModelConfig` fields to change (e.g. ``dtype="bfloat16"``).

  Returns:
    ``(config, params)``.

  Raises:
    FileNotFoundError: no directory, no ``config.json``, no weights, or a missing shard.
    ValueError: a damaged ``config.json``, index or weight file, or a tensor whose shape does
      not match the config (the message names the file and the tensor).
  """
  config = load_config(directory, **config_overrides)
  state, files = _read_safetensors(directory)
  source = os.path.join(os.path.expanduser(os.fspath(directory)), "config.json")
  if config_overrides:
    source += f" and the overrides {config_overrides}"
  host = params_from_state_dict(state, config, checkpoint=directory, files=files,
                                config_source=source)
  return config, place(host, shardings)


def place(host_params: PyTree, shardings: PyTree | None = None) -> PyTree:
  """Moves host parameters to devices, into ``shardings`` when given."""
  if shardings is None:
    return jax.tree.map(jnp.asarray, host_params)
  return jax.tree.map(lambda x, s: jax.device_put(x, s), host_params, shardings)


def save_hf(directory: str, params: PyTree, config: ModelConfig, *, tokenizer=None,
            max_shard_bytes: int | None = None) -> None:
  """Writes a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads.

  Args:
    directory: output directory (created), or a ``gs://`` URL: the files are written to a
      temporary directory and uploaded (``etils.epath`` and ``gcsfs``, of the train extra).
    params, config: the model.
    tokenizer: optional ``transformers`` tokenizer, saved alongside (with its chat template).
    max_shard_bytes: split the weights into several safetensors files with an index.
  """
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", str(directory)):
    import tempfile  # noqa: PLC0415
    from jkd.train import storage  # noqa: PLC0415 (needs the train extra's gcsfs)
    with tempfile.TemporaryDirectory() as local:
      save_hf(local, params, config, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
      storage.upload(local, str(directory))
    return
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  state = params_to_state_dict(params, config)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config.to_hf(), f, indent=2)
  if max_shard_bytes is None:
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  else:
    shards, current, size = [], {}, 0
    for name, array in state.items():
      if current and size + array.nbytes > max_shard_bytes:
        shards.append(current)
        current, size = {}, 0
      current[name] = array
      size += array.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(directory, fname), metadata={"format": "pt"})
      weight_map.update({k: fname for k in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(a.nbytes for a in state.values())},
                 "weight_map": weight_map}, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
