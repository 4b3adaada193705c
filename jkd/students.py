"""Students chosen by measurement: importance of a teacher's parts, pruning, candidate ranking.

A student made from a teacher's weights starts far closer to the teacher than a random one, but
only if the right parts are kept. Which parts matter is measured here, without training, on
calibration text (:func:`measure`, one teacher forward pass plus one per layer for the removal
scores):

==================  ==========================================================================
layer ``removal``   the calibration NLL of the teacher with that one layer removed (ShortGPT's
                    and Minitron's depth criterion; the higher, the more the layer matters)
layer ``influence`` block influence, ``1 - cos(layer input, layer output)`` averaged over tokens
                    (ShortGPT, Men et al. 2024): how much the layer changes the residual stream
``heads``           per layer and query head, the mean L2 norm of the head's contribution to the
                    residual stream (its attention output through its slice of ``o``): Minitron's
                    activation-based head importance, measured after the output projection
``mlp``             per layer and MLP channel, the mean ``|silu(gate) * up|`` times the L2 norm
                    of the channel's row of ``down`` (the channel's contribution; Minitron's
                    neuron importance with the output weight, as Wanda weighs activations)
``embed``           per residual channel, the mean ``|x|`` of the normalised inputs of every
                    attention and MLP block and of the final norm (Minitron's embedding-channel
                    importance)
==================  ==========================================================================

:func:`prune` makes a student from those scores: depth (``num_layers``: keep the layers whose
removal hurts most), MLP width (``intermediate_size``), query heads per KV group (``num_heads``)
and residual width (``hidden_size``), each keeping the highest-scoring parts in their original
order. :func:`rank_candidates` scores candidate shapes at initialisation (parameters, FLOPs per
token, NLL and KL to the teacher on the calibration text) and ranks them by that KL within a
parameter budget: the DisWOT / AutoDistil idea of choosing a student without training, with the
score that matters to distillation measured directly (docs/students.md says how well it
predicted the trained students on SmolLM2). ``student.source = "prune"`` uses all of this in a
training run; ``python -m jkd.students`` prints the table for any teacher.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jkd import models
from jkd import precision
from jkd.models import transformer

PyTree = Any
Array = jax.Array


class Importance(NamedTuple):
  """Importance scores of a teacher's parts on calibration text (see the module docstring).

  Attributes:
    nll: the teacher's mean NLL (nats/token) on the calibration tokens.
    tokens: how many tokens were scored.
    removal: ``[layers]`` calibration NLL with each layer removed (None when not measured).
    influence: ``[layers]`` block influence, ``1 - cos(input, output)``.
    heads: ``[layers, num_heads]`` head contribution norms.
    mlp: ``[layers, intermediate_size]`` MLP channel contributions.
    embed: ``[hidden_size]`` residual channel magnitudes.
  """
  nll: float
  tokens: int
  removal: np.ndarray | None
  influence: np.ndarray
  heads: np.ndarray
  mlp: np.ndarray
  embed: np.ndarray


def _check_batch(batch: Mapping[str, Any], vocab: int, i: int) -> tuple[np.ndarray, np.ndarray]:
  if "tokens" not in batch:
    raise ValueError(f"calibration batch {i} has no 'tokens' (keys {sorted(batch)}).")
  tokens = np.asarray(batch["tokens"])
  labels = np.asarray(batch.get("labels", np.concatenate(
      [tokens[:, 1:], np.full((tokens.shape[0], 1), -100)], axis=1)))
  if tokens.ndim != 2:
    raise ValueError(f"calibration batch {i}: tokens must be [batch, seq], got {tokens.shape}.")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise ValueError(f"calibration batch {i} has token ids in [{tokens.min()}, {tokens.max()}],"
                     f" outside the teacher's vocabulary of {vocab}: the calibration text was"
                     " tokenised for another model; tokenise it with the teacher's tokenizer.")
  if labels.size and labels.max() >= vocab:
    raise ValueError(f"calibration batch {i} has label ids up to {labels.max()}, outside the"
                     f" teacher's vocabulary of {vocab}: tokenise it with the teacher's"
                     " tokenizer.")
  return tokens, labels


def _masks(tokens: Array, labels: Array):
  valid = labels >= 0
  t = tokens.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = jnp.broadcast_to(causal, (tokens.shape[0], t, t))
  positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  return valid, mask, positions


def _nll_sums(logits: Array, labels: Array, valid: Array) -> tuple[Array, Array]:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)


@functools.partial(jax.jit, static_argnames="config")
def _stat_sums(params: PyTree, tokens: Array, labels: Array, *, config: models.ModelConfig):
  """One forward pass, layer by layer, summing every score over the batch's scored tokens."""
  valid, mask, positions = _masks(tokens, labels)
  w = valid.astype(jnp.float32)[..., None]
  dtype = jnp.dtype(config.dtype)
  block = transformer.Block(config)
  x = params["embed"]["embedding"].astype(dtype)[tokens]

  def layer(x, p):
    seen = {}

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__":
        seen[context.module.name] = (args[0], out)
      return out

    with nn.intercept_methods(record):
      y, _ = block.apply({"params": p}, x, positions, mask, None, None, None)
    heads_in = seen["o"][0].astype(jnp.float32)  # [B, T, nh, d]
    o = p["attn"]["o"]["kernel"].astype(jnp.float32)  # [nh, d, H]
    contrib = jnp.einsum("btnd,ndh->btnh", heads_in, o)
    heads = jnp.sum(jnp.linalg.norm(contrib, axis=-1) * w, axis=(0, 1))
    act = seen["down"][0].astype(jnp.float32)  # [B, T, F]
    down = jnp.linalg.norm(p["mlp"]["down"]["kernel"].astype(jnp.float32), axis=-1)
    mlp = jnp.sum(jnp.abs(act) * w, axis=(0, 1)) * down
    embed = sum(jnp.sum(jnp.abs(seen[n][1].astype(jnp.float32)) * w, axis=(0, 1))
                for n in ("attn_norm", "mlp_norm"))
    a, b = x.astype(jnp.float32), y.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) *
                                           jnp.linalg.norm(b, axis=-1), 1e-12)
    influence = jnp.sum((1.0 - cos) * valid)
    return y, (influence, heads, mlp, embed, x)

  x, (influence, heads, mlp, embed, inputs) = jax.lax.scan(layer, x, params["layers"])
  final = transformer.RMSNorm(config.rms_norm_eps, dtype, jnp.dtype(config.param_dtype)).apply(
      {"params": params["final_norm"]}, x)
  embed = jnp.sum(embed, axis=0) + jnp.sum(jnp.abs(final.astype(jnp.float32)) * w, axis=(0, 1))
  logits = _logits(params, config, final)
  nll, count = _nll_sums(logits, labels, valid)
  return {"nll": nll, "count": count, "influence": influence, "heads": heads, "mlp": mlp,
          "embed": embed}, inputs


def _logits(params: PyTree, config: models.ModelConfig, hidden: Array) -> Array:
  """``[B, T, V]`` float32 logits of final hidden states: the head product of ``apply``."""
  head = models.output_head(params, config).astype(config.dtype)
  return precision.dot(hidden, head, dtype=config.dtype, out_dtype=jnp.float32)


@functools.partial(jax.jit, static_argnames="config")
def _removed_nll(params: PyTree, inputs: Array, skip: Array, labels: Array, *,
                 config: models.ModelConfig):
  """NLL sums of the model without layer ``skip`` (traced: one compile for every layer).

  ``inputs`` ``[layers, B, T, H]`` holds every layer's input in the whole model: the model
  without layer ``skip`` has the same stream up to it, so only the layers after it run (a
  conditional per layer), half the work of running every layer for every removal.
  """
  valid, mask, positions = _masks(labels, labels)  # (labels have the tokens' shape)
  dtype = jnp.dtype(config.dtype)
  block = transformer.Block(config)

  def layer(x, jp):
    j, p = jp
    run = lambda: block.apply({"params": p}, x, positions, mask, None, None, None)[0]  # noqa: E731
    return jax.lax.cond(j > skip, run, lambda: x), None

  x, _ = jax.lax.scan(layer, inputs[skip], (jnp.arange(config.num_layers), params["layers"]))
  final = transformer.RMSNorm(config.rms_norm_eps, dtype, jnp.dtype(config.param_dtype)).apply(
      {"params": params["final_norm"]}, x)
  return _nll_sums(_logits(params, config, final), labels, valid)


def measure(params: PyTree, config: models.ModelConfig, batches: Iterable[Mapping[str, Any]],
            *, removal: bool = True) -> Importance:
  """Importance of a teacher's layers, heads, MLP channels and residual channels.

  Args:
    params, config: the teacher (a dense decoder; ``dtype`` is the compute dtype).
    batches: calibration batches with ``tokens`` ``[B, T]`` and ``labels`` ``[B, T]`` (-100 for
      tokens not scored; without ``labels`` every next token is scored), e.g. a
      :class:`jkd.data.DataPipeline`'s batches. All tokens feed the activations; the scores
      average over the scored ones.
    removal: also measure each layer's removal NLL (per layer, the layers after it run again
      from the stored stream: about half a forward pass each).

  Returns:
    :class:`Importance` (numpy arrays).

  Raises:
    ValueError: no scored token, token ids outside the vocabulary, or a mixture-of-experts
      teacher (its experts are not scored here).
  """
  if config.num_experts:
    raise ValueError("importance is measured for dense teachers; this one is a mixture of"
                     f" {config.num_experts} experts.")
  batches = [_check_batch(b, config.vocab_size, i) for i, b in enumerate(batches)]
  sums: dict[str, Any] = {}
  removed = np.zeros(config.num_layers)
  if removal and config.num_layers < 2:
    raise ValueError("a one-layer teacher has no layer to remove: measure with removal=False.")
  for tokens, labels in batches:
    out, inputs = _stat_sums(params, tokens, labels, config=config)
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
    if removal:
      for i in range(config.num_layers):
        nll, _ = _removed_nll(params, inputs, jnp.int32(i), labels, config=config)
        removed[i] += float(nll)
    del inputs
  count = float(sums.get("count", 0))
  if count == 0:
    raise ValueError("the calibration data has no scored token (empty, or every label is"
                     " -100): give it some text.")
  per_norm = 2 * config.num_layers + 1
  return Importance(nll=float(sums["nll"]) / count, tokens=int(count),
                    removal=removed / count if removal else None,
                    influence=sums["influence"] / count, heads=sums["heads"] / count,
                    mlp=sums["mlp"] / count, embed=sums["embed"] / (count * per_norm))


# ---------------------------------------------------------------------------------------------
# Pruning.

def _top(scores: np.ndarray, k: int) -> np.ndarray:
  """Indices of the ``k`` highest scores, in ascending index order (ties: lower index)."""
  order = np.argsort(-np.asarray(scores), kind="stable")[:k]
  return np.sort(order)


#: How layers are ranked: by their removal NLL or their block influence.
LAYER_SCORES = ("removal", "influence")


def layer_order(importance: Importance, by: str = "removal") -> list[int]:
  """The teacher's layers from the least to the most important by ``removal`` or
  ``influence``."""
  scores = {"removal": importance.removal, "influence": importance.influence}.get(by)
  if by not in LAYER_SCORES:
    raise ValueError(f"layers are ranked by 'removal' or 'influence', not {by!r}.")
  if scores is None:
    raise ValueError("the importance has no removal scores: measure(..., removal=True).")
  return [int(i) for i in np.argsort(np.asarray(scores), kind="stable")]


def _check_size(name: str, value: int | None, full: int, step: int = 1) -> int:
  if value is None:
    return full
  if not isinstance(value, (int, np.integer)) or not 1 <= value <= full or value % step:
    more = f" and a multiple of {step}" if step > 1 else ""
    raise ValueError(f"{name}={value!r} must be an int in [1, {full}]{more} (the teacher's"
                     f" {full}): a pruned student keeps a subset of the teacher's {name}.")
  return int(value)


def check_sizes(config: models.ModelConfig, **sizes: int | None) -> dict[str, int]:
  """:func:`prune`'s sizes checked against the teacher ``config`` (None: the teacher's), as
  ``{name: size}``.

  >>> check_sizes(models.ModelConfig(num_layers=4), num_layers=0)
  Traceback (most recent call last):
  ...
  ValueError: num_layers=0 must be an int in [1, 4] (the teacher's 4): a pruned student keeps a subset of the teacher's num_layers.
  """
  full = {"num_layers": config.num_layers, "intermediate_size": config.intermediate_size,
          "num_heads": config.num_heads, "hidden_size": config.hidden_size}
  unknown = set(sizes) - set(full)
  if unknown:
    raise ValueError(f"unknown pruning sizes {sorted(unknown)}; choose from {list(full)}.")
  if config.num_experts:
    raise ValueError("pruning is for dense teachers; this one is a mixture of"
                     f" {config.num_experts} experts.")
  return {k: _check_size(k, sizes.get(k), n, config.num_kv_heads if k == "num_heads" else 1)
          for k, n in full.items()}


def prune(params: PyTree, config: models.ModelConfig, importance: Importance, *,
          num_layers: int | None = None, intermediate_size: int | None = None,
          num_heads: int | None = None, hidden_size: int | None = None,
          layers_by: str = "removal") -> tuple[models.ModelConfig, PyTree]:
  """A student made of the teacher's most important parts (depth and width pruning).

  Args:
    params, config: the teacher.
    importance: its scores (:func:`measure`).
    num_layers: layers kept: the ones whose removal hurts most (``layers_by="removal"``) or that
      change the residual stream most (``"influence"``), in their original order.
    intermediate_size: MLP channels kept per layer (each layer its own best channels).
    num_heads: query heads kept, a multiple of ``num_kv_heads``: each KV head keeps its best
      ``num_heads / num_kv_heads`` query heads (every KV head stays).
    hidden_size: residual channels kept (the embedding, every norm and every projection's
      residual side are sliced alike).

  Returns:
    ``(student_config, student_params)``; ``head_dim`` is fixed at the teacher's, so pruning
    heads or the residual width leaves each head's width as it was.

  Raises:
    ValueError: a size outside ``[1, teacher's]`` (a ratio that leaves nothing), heads that do
      not divide into the KV groups, a mixture-of-experts teacher, or importance measured on
      another shape.
  """
  sizes = check_sizes(config, num_layers=num_layers, intermediate_size=intermediate_size,
                      num_heads=num_heads, hidden_size=hidden_size)
  n, f, nh, nkv, h = (config.num_layers, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.hidden_size)
  if (importance.heads.shape != (n, nh) or importance.mlp.shape != (n, f)
      or importance.embed.shape != (h,)):
    raise ValueError(f"the importance was measured on another model (heads {importance.heads.shape},"
                     f" mlp {importance.mlp.shape}, embed {importance.embed.shape}) than this"
                     f" teacher ({n} layers, {nh} heads, {f} MLP channels, width {h}).")
  num_layers, intermediate_size, num_heads, hidden_size = (
      sizes["num_layers"], sizes["intermediate_size"], sizes["num_heads"], sizes["hidden_size"])
  order = layer_order(importance, layers_by) if num_layers < n else list(range(n))
  keep = np.sort(np.asarray(order[n - num_layers:])) if num_layers < n else np.arange(n)
  lp = jax.tree.map(lambda x: np.asarray(x)[keep], params["layers"])
  heads, mlp = importance.heads[keep], importance.mlp[keep]
  ch = _top(importance.embed, hidden_size) if hidden_size < h else np.arange(h)

  def take(x, idx, axis):  # per-layer indices idx [L, k] along ``axis`` of x [L, ...]
    idx = np.asarray(idx)
    shape = [1] * x.ndim
    shape[0], shape[axis] = idx.shape[0], idx.shape[1]
    return np.take_along_axis(x, idx.reshape(shape), axis=axis)

  attn, mlp_p = dict(lp["attn"]), dict(lp["mlp"])
  if num_heads < nh:
    group, kept_group = nh // nkv, num_heads // nkv
    idx = np.stack([np.concatenate([
        g * group + _top(heads[l, g * group:(g + 1) * group], kept_group) for g in range(nkv)])
        for l in range(len(keep))])
    attn["q"] = {k: take(v, idx, 2 if k == "kernel" else 1) for k, v in attn["q"].items()}
    attn["o"] = {"kernel": take(attn["o"]["kernel"], idx, 1)}
  if intermediate_size < f:
    idx = np.stack([_top(mlp[l], intermediate_size) for l in range(len(keep))])
    mlp_p["gate"] = {"kernel": take(mlp_p["gate"]["kernel"], idx, 2)}
    mlp_p["up"] = {"kernel": take(mlp_p["up"]["kernel"], idx, 2)}
    mlp_p["down"] = {"kernel": take(mlp_p["down"]["kernel"], idx, 1)}
  out_layers = dict(lp, attn=attn, mlp=mlp_p)
  top = {k: v for k, v in params.items() if k != "layers"}
  if hidden_size < h:
    for name in ("q", "k", "v"):
      attn[name] = dict(attn[name], kernel=np.asarray(attn[name]["kernel"])[:, ch])
    attn["o"] = {"kernel": np.asarray(attn["o"]["kernel"])[..., ch]}
    for name in ("gate", "up"):
      mlp_p[name] = {"kernel": np.asarray(mlp_p[name]["kernel"])[:, ch]}
    mlp_p["down"] = {"kernel": np.asarray(mlp_p["down"]["kernel"])[..., ch]}
    for name in ("attn_norm", "mlp_norm"):
      out_layers[name] = {"scale": np.asarray(lp[name]["scale"])[:, ch]}
    top["embed"] = {"embedding": np.asarray(params["embed"]["embedding"])[:, ch]}
    top["final_norm"] = {"scale": np.asarray(params["final_norm"]["scale"])[ch]}
    if "lm_head" in top:
      top["lm_head"] = np.asarray(top["lm_head"])[ch]
  student = jax.tree.map(lambda x: jnp.asarray(np.array(x)), dict(top, layers=out_layers))
  student_config = config.replace(num_layers=int(len(keep)), intermediate_size=intermediate_size,
                                  num_heads=num_heads, hidden_size=hidden_size,
                                  head_dim=config.dim_per_head)
  return student_config, student


# ---------------------------------------------------------------------------------------------
# Counting and ranking.

def count_params(config: models.ModelConfig) -> dict[str, int]:
  """``{"embedding": ..., "non_embedding": ..., "total": ...}`` parameters of a dense decoder
  (the embedding counted once when tied; norms and biases included)."""
  h, d, nh, nkv = config.hidden_size, config.dim_per_head, config.num_heads, config.num_kv_heads
  attn = h * d * (2 * nh + 2 * nkv) + (d * (nh + 2 * nkv) if config.qkv_bias else 0) + (
      2 * d if config.qk_norm else 0)
  experts = max(config.num_experts, 1)
  mlp = experts * 3 * h * config.intermediate_size + (h * config.num_experts
                                                       if config.num_experts else 0)
  non_embedding = config.num_layers * (attn + mlp + 2 * h) + h
  embedding = config.vocab_size * h * (1 if config.tie_embeddings else 2)
  return {"embedding": embedding, "non_embedding": non_embedding,
          "total": embedding + non_embedding}


def flops_per_token(config: models.ModelConfig, seq_len: int) -> float:
  """Forward FLOPs per token at ``seq_len`` (matmuls: 2 per weight, the head included, plus
  causal attention's scores and mixing at the average context ``seq_len / 2``)."""
  weights = count_params(config)["non_embedding"] + config.vocab_size * config.hidden_size
  attention = config.num_layers * 2 * 2 * config.num_heads * config.dim_per_head * seq_len / 2
  return 2.0 * weights + attention


class Candidate(NamedTuple):
  """A student shape to try: a name and :func:`prune`'s sizes."""
  name: str
  num_layers: int | None = None
  intermediate_size: int | None = None
  num_heads: int | None = None
  hidden_size: int | None = None


def default_candidates(config: models.ModelConfig, budget: float) -> list[Candidate]:
  """Depth-only, MLP-width-only, head, residual-width and mixed shapes near ``budget`` (a share
  of the teacher's non-embedding parameters)."""
  full = count_params(config)["non_embedding"]
  n, f, nh, nkv, h = (config.num_layers, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.hidden_size)

  def fits(c: Candidate) -> bool:
    return count_params(shape(config, c))["non_embedding"] <= budget * full

  def largest(make, values):
    fitting = [v for v in values if fits(make(v))]
    return make(max(fitting)) if fitting else None

  out = [largest(lambda v: Candidate(f"depth {v}/{n} layers", num_layers=v), range(1, n + 1)),
         largest(lambda v: Candidate(f"MLP {v}/{f}", intermediate_size=v),
                 range(64, f + 1, 64)),
         largest(lambda v: Candidate(f"width {v}/{h}", hidden_size=v), range(64, h + 1, 32))]
  if nh // nkv > 1:
    for g in range(nh // nkv - 1, 0, -1):
      out.append(largest(lambda v, g=g: Candidate(
          f"heads {g * nkv}/{nh} + MLP {v}", num_heads=g * nkv, intermediate_size=v),
                         range(64, f + 1, 64)))
  for share in (0.9, 0.8, 0.7):
    layers = max(1, round(n * share))
    out.append(largest(lambda v, k=layers: Candidate(
        f"depth {k} + MLP {v}", num_layers=k, intermediate_size=v), range(64, f + 1, 64)))
  seen, unique = set(), []
  for c in out:
    if c is not None and c[1:] not in seen:
      seen.add(c[1:])
      unique.append(c)
  return unique


def shape(config: models.ModelConfig, candidate: Candidate) -> models.ModelConfig:
  """The config :func:`prune` makes for ``candidate``."""
  return config.replace(**{k: v for k, v in candidate._asdict().items()
                           if k != "name" and v is not None}, head_dim=config.dim_per_head)


@functools.partial(jax.jit, static_argnames=("config", "teacher_config"))
def _init_sums(params, teacher_params, tokens, labels, *, config, teacher_config):
  valid = labels >= 0
  s = models.apply(params, tokens, config=config.replace(scan_unroll=1)).logits
  t = models.apply(teacher_params, tokens, config=teacher_config.replace(scan_unroll=1)).logits
  nll, count = _nll_sums(s, labels, valid)
  ls, lt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
  kl = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
  top1 = jnp.argmax(s, -1) == jnp.argmax(t, -1)
  return {"nll": nll, "count": count, "kl": jnp.sum(jnp.where(valid, kl, 0.0)),
          "top1": jnp.sum(top1 & valid)}


def evaluate_init(params, config, teacher_params, teacher_config, batches) -> dict[str, float]:
  """A student's NLL, KL(teacher || student) and top-1 agreement on ``batches`` (no training)."""
  sums: dict[str, float] = {}
  for i, b in enumerate(batches):
    tokens, labels = _check_batch(b, teacher_config.vocab_size, i)
    out = _init_sums(params, teacher_params, tokens, labels, config=config,
                     teacher_config=teacher_config)
    for k, v in jax.device_get(out).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  count = max(sums.get("count", 0.0), 1.0)
  return {"nll": sums["nll"] / count, "kl": sums["kl"] / count, "top1": sums["top1"] / count}


def rank_candidates(params: PyTree, config: models.ModelConfig, importance: Importance,
                    batches: Sequence[Mapping[str, Any]], *,
                    candidates: Sequence[Candidate] | None = None, budget: float = 0.6,
                    seq_len: int = 128) -> list[dict[str, Any]]:
  """Candidate students at initialisation, best first (lowest KL to the teacher).

  Args:
    params, config, importance: the teacher and its :func:`measure` scores.
    batches: held-out calibration batches the candidates are scored on (use other text than
      the importance was measured on).
    candidates: shapes to try; default :func:`default_candidates` at ``budget``.
    budget: the largest share of the teacher's non-embedding parameters a candidate may keep
      (candidates over it are listed but ranked last).
    seq_len: context length of the FLOPs count.

  Returns:
    One dict per candidate: ``name``, ``config``, ``params`` (non-embedding), ``share`` (of the
    teacher's), ``flops`` (forward, per token), ``nll``, ``kl``, ``top1`` and ``fits``.
  """
  if not 0 < budget <= 1:
    raise ValueError(f"budget must be a share of the teacher's parameters in (0, 1], got"
                     f" {budget}.")
  candidates = list(candidates or default_candidates(config, budget))
  if not candidates:
    raise ValueError(f"no candidate fits a budget of {budget:.0%} of the teacher.")
  full = count_params(config)["non_embedding"]
  rows = []
  for c in candidates:
    s_config, s_params = prune(params, config, importance, **{
        k: v for k, v in c._asdict().items() if k != "name"})
    n = count_params(s_config)["non_embedding"]
    metrics = evaluate_init(s_params, s_config, params, config, batches)
    rows.append(dict(name=c.name, candidate=c, config=s_config, params=n, share=n / full,
                     flops=flops_per_token(s_config, seq_len), fits=n <= budget * full,
                     **metrics))
    del s_params
  return sorted(rows, key=lambda r: (not r["fits"], r["kl"]))


def table(rows: Sequence[Mapping[str, Any]], teacher: models.ModelConfig | None = None,
          seq_len: int = 128) -> str:
  """A Markdown table of :func:`rank_candidates`' rows."""
  lines = ["| rank | student | non-embedding params | share | GFLOPs/token | NLL at init |"
           " KL at init (score) | top-1 at init |", "|---|---|---|---|---|---|---|---|"]
  if teacher is not None:
    lines.append(f"| - | teacher | {count_params(teacher)['non_embedding'] / 1e6:.1f} M | 100% |"
                 f" {flops_per_token(teacher, seq_len) / 1e9:.3f} | - | - | - |")
  for i, r in enumerate(rows, 1):
    lines.append(f"| {i if r['fits'] else '-'} | {r['name']} | {r['params'] / 1e6:.1f} M |"
                 f" {r['share']:.0%} | {r['flops'] / 1e9:.3f} | {r['nll']:.3f} | {r['kl']:.3f} |"
                 f" {r['top1']:.1%} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line.

def _jsonl_batches(path: str, tokenizer, *, vocab: int, seq_len: int, batch_size: int,
                   limit: int) -> list[dict[str, np.ndarray]]:
  """Batches of a JSONL file of any jkd text shape (``text``, ``prompt``/``completion``, ...)."""
  import json  # noqa: PLC0415
  from jkd.data import examples  # noqa: PLC0415
  from jkd.data import jsonl  # noqa: PLC0415

  rows = []
  with open(path) as f:
    for i, line in enumerate(f):
      if line.strip():
        record = json.loads(line)
        shape_name = jsonl.detect_shape(record.keys(), f"{path}:{i + 1}")
        ex = examples.tokenize_example(record, tokenizer, shape=shape_name, seq_len=seq_len,
                                       vocab_size=vocab, name=f"{path}:{i + 1}")
        if ex is not None:
          rows.append(examples.pad_example(ex, seq_len))
      if len(rows) >= limit:
        break
  if not rows:
    raise ValueError(f"{path} gave no calibration example: it is empty or holds no text to"
                     " score.")
  return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in ("tokens", "labels")}
          for i in range(0, len(rows), batch_size)]


def _calibration(args, loaded) -> list[dict[str, np.ndarray]]:
  import os  # noqa: PLC0415
  import tempfile  # noqa: PLC0415
  from jkd.data import corpus as corpus_lib  # noqa: PLC0415
  from jkd.data import pipeline  # noqa: PLC0415

  vocab = loaded.config.vocab_size
  n = args.batches * 2  # Half for the importance, half for scoring the candidates.
  path = os.path.expanduser(args.calibration)
  if path.endswith(".jsonl"):
    return _jsonl_batches(path, loaded.tokenizer, vocab=vocab, seq_len=args.seq_len,
                          batch_size=args.batch_size, limit=n * args.batch_size)
  if not path:  # The teacher answers shipped prompts (the held-out ones are left out).
    from jkd.train.sources.corpus import split_prompts  # noqa: PLC0415
    records = split_prompts(corpus_lib.read_prompts(corpus_lib.SHIPPED_PROMPTS), 10)[0]
    records = records[:n * args.batch_size]
    path = corpus_lib.generate_corpus(
        records, tempfile.mkdtemp(prefix="jkd_students_"), params=loaded.params,
        config=loaded.config, tokenizer=loaded.tokenizer, max_new_tokens=args.seq_len // 2,
        batch_size=args.batch_size, name="calibration", teacher=loaded.spec)
  source = pipeline.text_pipeline(path, "train", batch_size=args.batch_size,
                                  seq_len=args.seq_len, tokenizer=loaded.tokenizer,
                                  vocab_size=vocab, shuffle=False)
  it = iter(source)
  return [next(it) for _ in range(n)]


def _parse_candidate(text: str) -> Candidate:
  """``"layers=17,mlp=960,heads=6,width=512"`` -> a :class:`Candidate`."""
  names = {"layers": "num_layers", "mlp": "intermediate_size", "heads": "num_heads",
           "width": "hidden_size"}
  sizes = {}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    if key not in names or not value.isdigit():
      raise ValueError(f"bad candidate {text!r}: write e.g. 'layers=17,mlp=960' with keys"
                       f" {list(names)}.")
    sizes[names[key]] = int(value)
  return Candidate(text, **sizes)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """``python -m jkd.students``: the candidate table for a teacher (see ``--help``)."""
  import argparse  # noqa: PLC0415
  import json  # noqa: PLC0415
  import sys  # noqa: PLC0415
  import time  # noqa: PLC0415
  from jkd.data import model_spec  # noqa: PLC0415

  p = argparse.ArgumentParser(
      prog="python -m jkd.students",
      description="Rank candidate students pruned from a teacher, without training: the"
      " teacher's importance is measured on calibration text, each candidate is pruned from"
      " it and scored at initialisation on other text.")
  p.add_argument("--teacher", default="smollm2", help="a model spec: smollm2, gguf:FILE, hf:DIR")
  p.add_argument("--calibration", default="",
                 help="a JSONL file (any jkd text shape) or a jkd/TFDS text dataset directory;"
                 " default: the teacher's answers to jkd's shipped prompts")
  p.add_argument("--budget", type=float, default=0.6,
                 help="largest share of the teacher's non-embedding parameters (default 0.6)")
  p.add_argument("--candidate", action="append", default=[],
                 help="a shape to rank, e.g. layers=17 or layers=24,mlp=960 (repeatable);"
                 " default: depth, width and mixed shapes near the budget")
  p.add_argument("--layers-by", default="removal", choices=LAYER_SCORES)
  p.add_argument("--batches", type=int, default=2,
                 help="calibration batches for the importance (as many again score candidates)")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--json", default="", help="also write the rows (and the importance) here")
  args = p.parse_args(argv)
  try:
    if args.batches < 1 or args.batch_size < 1 or args.seq_len < 2:
      raise ValueError("--batches and --batch-size must be >= 1, --seq-len >= 2.")
    if not 0 < args.budget <= 1:
      raise ValueError(f"--budget must be in (0, 1], got {args.budget}.")
    candidates = [_parse_candidate(c) for c in args.candidate] or None
    loaded = model_spec.load_model(args.teacher)
    if candidates:
      for c in candidates:
        check_sizes(loaded.config, **{k: v for k, v in c._asdict().items() if k != "name"})
    t0 = time.perf_counter()
    batches = _calibration(args, loaded)
    half = max(1, len(batches) // 2)
    imp = measure(loaded.params, loaded.config, batches[:half],
                  removal=args.layers_by == "removal")
    rows = rank_candidates(loaded.params, loaded.config, imp, batches[half:] or batches[:half],
                           candidates=candidates, budget=args.budget, seq_len=args.seq_len)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(f"teacher {args.teacher}: NLL {imp.nll:.3f} on {imp.tokens} calibration tokens;"
        f" layers from least to most important ({args.layers_by}):"
        f" {layer_order(imp, args.layers_by)}")
  print(table(rows, loaded.config, args.seq_len))
  print(f"({time.perf_counter() - t0:.0f} s; score: KL(teacher || student) at initialisation on"
        " held-apart calibration text, lower is better; rank '-': over the budget)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"importance": {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                for k, v in imp._asdict().items()},
                 "rows": [{k: v for k, v in r.items() if k not in ("config", "candidate")}
                          for r in rows]}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
