"""Model configuration for jkd's decoder-only transformers (Llama, SmolLM, Mistral, Qwen2, Qwen3).

:class:`ModelConfig` is a frozen dataclass (hashable: it is a static argument of jitted
functions). It converts from and to Hugging Face ``config.json`` dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

#: Hugging Face ``model_type`` -> the architecture's fixed traits.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": False, "qk_norm": False, "hf_class": "LlamaForCausalLM"},
    "mistral": {"qkv_bias": False, "qk_norm": False, "hf_class": "MistralForCausalLM"},
    "qwen2": {"qkv_bias": True, "qk_norm": False, "hf_class": "Qwen2ForCausalLM"},
    "qwen3": {"qkv_bias": False, "qk_norm": True, "hf_class": "Qwen3ForCausalLM"},
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and options of a decoder-only transformer.

  Attributes:
    architecture: ``llama``, ``mistral``, ``qwen2`` or ``qwen3`` (SmolLM is ``llama``).
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: shapes.
    head_dim: per-head width (``hidden_size // num_heads`` unless given, e.g. Qwen3).
    rope_theta: RoPE base frequency.
    rope_scaling: ``None`` or a Llama-3 scaling tuple ``(factor, low_freq_factor,
      high_freq_factor, original_max_position_embeddings)``.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: output head is the transposed input embedding.
    qkv_bias: bias on the q/k/v projections (Qwen2). qk_norm: RMSNorm on q and k per head
      (Qwen3).
    max_position_embeddings: longest context the model was trained for.
    num_experts: 0 for a dense MLP, else a top-``num_experts_per_tok`` mixture of experts.
    router_aux_loss_coef: weight of the load-balancing loss, for the objective.
    dtype: compute dtype, ``float32`` or ``bfloat16`` (parameters stay ``param_dtype``).
    param_dtype: parameter dtype (``float32``).
    remat: rematerialise each layer in the backward pass (saves activation memory).
    scan_unroll: layers per iteration of the scan over layers: 1 compiles one layer body (the
      fastest compile); ``num_layers`` unrolls the stack into straight-line code, which on CPU
      runs a small model's forward + backward faster (no per-layer slices of the stacked
      weights and activations) at the price of a longer compile. Values round the same.
  """
  architecture: str = "llama"
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple[float, float, float, int] | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 8192
  num_experts: int = 0
  num_experts_per_tok: int = 2
  router_aux_loss_coef: float = 0.01
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False
  scan_unroll: int = 1

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"unsupported architecture {self.architecture!r}; supported:"
                       f" {sorted(ARCHITECTURES)} (SmolLM and Llama 3 are 'llama').")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int (got {value!r}).")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads"
                       f" ({self.num_kv_heads}) for grouped-query attention.")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads"
                       f" ({self.num_heads}); give head_dim explicitly.")
    if self.dtype not in ("float32", "bfloat16") or self.param_dtype not in ("float32",
                                                                              "bfloat16"):
      raise ValueError(f"dtype/param_dtype must be 'float32' or 'bfloat16' (got {self.dtype!r},"
                       f" {self.param_dtype!r}).")
    if isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, int) \
        or self.scan_unroll < 1:
      raise ValueError(f"ModelConfig.scan_unroll must be an int >= 1 (got {self.scan_unroll!r});"
                       " use num_layers to unroll the layer stack fully.")
    if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in"
                       f" [1, num_experts={self.num_experts}].")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **changes) -> "ModelConfig":
    """A copy with ``changes`` (e.g. ``num_layers=6`` for a student)."""
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    """From a Hugging Face ``config.json`` dict; unsupported features are clear errors."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise ValueError(f"unsupported model_type {model_type!r} in config.json; jkd supports"
                       f" {sorted(ARCHITECTURES)}.")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_scaling = None
    rope_theta = hf.get("rope_theta")
    if isinstance(scaling, Mapping):
      rope_theta = rope_theta or scaling.get("rope_theta")
      kind = scaling.get("rope_type", scaling.get("type"))
      if kind == "llama3":
        rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                        float(scaling["high_freq_factor"]),
                        int(scaling["original_max_position_embeddings"]))
      elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}; jkd supports 'llama3' and none.")
    if hf.get("sliding_window") and hf.get("use_sliding_window", model_type == "mistral"):
      raise ValueError("sliding-window attention is not supported; set sliding_window to null"
                       " (full attention) if the model allows it.")
    num_experts = int(hf.get("num_local_experts", hf.get("num_experts", 0)) or 0)
    arch = ARCHITECTURES[model_type]
    num_heads = int(hf["num_attention_heads"])
    kwargs = dict(
        architecture=model_type, vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]), intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]), num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=hf.get("head_dim"), rope_theta=float(rope_theta or 10000.0),
        rope_scaling=rope_scaling, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bool(hf.get("attention_bias", arch["qkv_bias"])) or arch["qkv_bias"],
        qk_norm=arch["qk_norm"],
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        num_experts=num_experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)))
    if kwargs["head_dim"] is not None:
      kwargs["head_dim"] = int(kwargs["head_dim"])
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict of this model (dense models)."""
    if self.num_experts:
      raise ValueError("exporting a mixture-of-experts student to Hugging Face is not supported.")
    arch = ARCHITECTURES[self.architecture]
    hf = {
        "architectures": [arch["hf_class"]], "model_type": self.architecture,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.dim_per_head, "rope_theta": self.rope_theta,
        "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_embeddings,
        "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if self.architecture in ("llama", "mistral"):
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = False
    if self.architecture == "mistral":
      hf["sliding_window"] = None
    if self.architecture in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = False
      hf["sliding_window"] = None
    if self.rope_scaling is not None:
      factor, low, high, original = self.rope_scaling
      hf["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high,
                            "original_max_position_embeddings": original}
    return hf
