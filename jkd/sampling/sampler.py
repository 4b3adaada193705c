"""Autoregressive generation from jkd decoders: a jitted prefill and a KV-cached decode loop.

:func:`generate` left-pads a batch of prompts, runs the prompt through the model once (prefill,
writing the KV cache) and then decodes one token per step inside a ``jax.lax.while_loop`` that
ends as soon as every sequence has produced a stop token (or ``max_new_tokens``). Prefill and loop
are one XLA program: no host round trip per token, and the cache is updated in place.

The prefill is the model's own :func:`~jkd.models.apply` with a cache; the decode step
(:mod:`jkd.sampling.decode`) runs the layers unrolled on per-layer weights and caches laid out
for one-token attention, because a decode step is memory-bound and ``nn.scan``'s per-step copies
of each layer's weights and cache slices would double its traffic. The per-layer weights are
sliced once per call: the program holds a second copy of the layer weights while it runs.

Compilation is per *shape bucket*: the prompt length is padded up to a multiple of ``bucket`` and
the batch up to a power of two, and the jitted function is cached by (config, bucketed shapes,
static options: greedy, top-k, whether top-p / min-p are on, ``return_logits``), so prompts of
varying length reuse one executable. Temperature, top-p, min-p, the stop ids, the pad id and the
key are traced arguments (changing them does not recompile); :func:`compile_count` tells how many
executables exist (for tests).

Parameters keep whatever sharding they carry (``jax.jit`` follows its inputs' shardings).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd import partitioning, runtime
from jkd.models import transformer
from jkd.models.config import ModelConfig
from jkd.sampling.decode import decode_step, from_model_cache, prepare_head, prepare_layers

Array = jax.Array
PyTree = Any


class SampleOutput(NamedTuple):
  """What :func:`generate` returns (batch in the order of the prompts).

  Attributes:
    tokens: ``[B, max_new_tokens]`` int32 new tokens; ``pad_id`` after a sequence's stop token.
    lengths: ``[B]`` int32 number of new tokens, the stop token included.
    logprobs: ``[B, max_new_tokens]`` float32 log-probability of each new token under the
      model's *unfiltered, temperature-1* distribution ``log_softmax(logits)`` (0 after the stop):
      the model's own probability of the sequence, which is what on-policy distillation and
      importance weights need, whatever filters and temperature drew the sample.
    prompt_lengths: ``[B]`` int32 number of real prompt tokens.
    logits: ``[B, max_new_tokens, vocab]`` float32 raw logits of each step when
      ``return_logits=True``, else ``None``.
  """
  tokens: Array
  lengths: Array
  logprobs: Array
  prompt_lengths: Array
  logits: Array | None = None


# ------------------------------------------------------------------------------------------------
# Filters


def _is_static(value) -> bool:
  """A Python / NumPy number (not a JAX array or tracer): its value is known when tracing."""
  return isinstance(value, numbers.Real)


def check_filters(*, top_k=0, top_p=1.0, min_p=0.0) -> None:
  """Raises ``ValueError`` for filter values out of range (traced values are not checked).

  Args:
    top_k: an ``int >= 0`` (0: off).
    top_p: in ``(0, 1]`` (1: off).
    min_p: in ``[0, 1]`` (0: off).
  """
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {top_k!r}.")
  if _is_static(top_p) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {top_p!r}.")
  if _is_static(min_p) and not 0.0 <= min_p <= 1.0:
    raise ValueError(f"min_p must be in [0, 1] (0 turns it off), got {min_p!r}.")


#: Top-p first looks for the nucleus among this many most likely tokens (exact whenever they
#: hold at least ``top_p`` of the mass, as language models' distributions nearly always do);
#: otherwise it sorts the whole vocabulary. Sorting 49k logits per row per step dominated
#: sampling on CPU.
NUCLEUS_CANDIDATES = 256


def _threshold_of(desc: Array, top_p) -> Array:
  """The smallest kept logit of a top-p filter, from logits sorted in decreasing order."""
  probs = jax.nn.softmax(desc, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = ((before < top_p) | (top_p >= 1.0)).at[..., 0].set(True)  # float32 cumsum hits 1
  return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)


def _nucleus_threshold(x: Array, top_p) -> Array:
  """:func:`_threshold_of` over the full vocabulary, computed from the top
  :data:`NUCLEUS_CANDIDATES` logits when they hold at least ``top_p`` of the probability (then
  every token outside them has ``top_p`` of mass before it and is removed anyway)."""
  k = min(NUCLEUS_CANDIDATES, x.shape[-1])
  if k == x.shape[-1]:
    return _threshold_of(-jnp.sort(-x, axis=-1), top_p)
  top = jax.lax.top_k(x, k)[0]
  lse_all = jax.nn.logsumexp(x, axis=-1, keepdims=True)
  top_mass = jnp.exp(jax.nn.logsumexp(top, axis=-1, keepdims=True) - lse_all)
  # The candidates' own softmax renormalises; compare masses against the full distribution by
  # scaling top_p: kept iff (mass before) / top_mass < top_p / top_mass.
  enough = jnp.all(top_mass >= top_p)
  return jax.lax.cond(
      enough,
      lambda: _threshold_of(top, top_p / top_mass),
      lambda: _threshold_of(-jnp.sort(-x, axis=-1), top_p))


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float | Array = 1.0,
                  min_p: float | Array = 0.0) -> Array:
  """Sets the logits of the tokens removed by top-k, top-p and min-p to ``-inf``.

  Applied in this order (Hugging Face's), each to the survivors of the previous one,
  renormalised:

  * top-k: keep the ``top_k`` largest logits (ties with the k-th largest are kept too);
  * top-p (nucleus, Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability sums to at least ``top_p``: token ``i`` (in decreasing order) is kept iff
    ``sum_{j<i} p_j < top_p``; the most likely token is always kept;
  * min-p (Nguyen et al. 2024): keep the tokens with ``p_i >= min_p * max_j p_j``.

  A filter at its neutral value (``top_k=0``, ``top_p=1``, ``min_p=0`` as Python numbers) costs
  nothing; ``top_p`` and ``min_p`` may be traced scalars (one compilation for all values).
  Sample with ``jax.random.categorical(key, filter_logits(logits / temperature, ...))``.

  Args:
    logits: ``[..., vocab]`` logits (already divided by the temperature).
    top_k: number of tokens kept (0: off); a static int.
    top_p: nucleus mass in ``(0, 1]`` (1: off).
    min_p: probability floor relative to the most likely token, in ``[0, 1]`` (0: off).

  Returns:
    ``[..., vocab]`` float32 logits, ``-inf`` where removed.

  >>> filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.75).tolist()[2:]
  [-inf, -inf]
  """
  check_filters(top_k=top_k, top_p=top_p, min_p=min_p)
  x = jnp.asarray(logits, jnp.float32)
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if not (_is_static(top_p) and top_p == 1.0):
    x = jnp.where(x >= _nucleus_threshold(x, top_p), x, -jnp.inf)
  if not (_is_static(min_p) and min_p == 0.0):
    top = jnp.max(x, axis=-1, keepdims=True)
    x = jnp.where(x - top >= jnp.log(jnp.asarray(min_p, jnp.float32)), x, -jnp.inf)
  return x


# ------------------------------------------------------------------------------------------------
# Prompts and buckets


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)][0]
    raise ValueError(f"{what} holds token id {int(bad)} outside the vocabulary [0, {vocab_size});"
                     " was the prompt tokenized for another model?")


def _as_int_array(x, what: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.size == 0:
    arr = arr.astype(np.int64)
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
    raise ValueError(f"{what} must hold integer token ids, got dtype {arr.dtype}.")
  return arr.astype(np.int64)


def prompt_rows(prompts, vocab_size: int) -> list[np.ndarray]:
  """The real tokens of each prompt, validated.

  Args:
    prompts: a list of token-id lists (any lengths), a ``[B, T]`` int array (all tokens real), or
      a ``([B, T] tokens, [B, T] mask)`` pair whose mask is 1 on real tokens (padding anywhere).
    vocab_size: ids must be in ``[0, vocab_size)``.

  Returns:
    A list of ``B`` 1-D int arrays, each non-empty.
  """
  if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
    tokens = _as_int_array(prompts[0], "prompt tokens")
    mask = np.asarray(prompts[1])
    if mask.shape != tokens.shape:
      raise ValueError(f"prompt mask shape {list(mask.shape)} != tokens shape"
                       f" {list(tokens.shape)}.")
    mask = mask != 0
    rows = [tokens[i][mask[i]] for i in range(tokens.shape[0])]
  elif isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
    tokens = _as_int_array(prompts, "prompt tokens")
    rows = list(tokens)
  elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
    rows = []
    for i, p in enumerate(prompts):
      if np.ndim(p) != 1:
        raise ValueError(f"prompt {i} must be a flat list of token ids, got shape"
                         f" {list(np.shape(p))}.")
      rows.append(_as_int_array(p, f"prompt {i}"))
  else:
    raise ValueError("prompts must be a list of token-id lists, a [batch, seq] int array or a"
                     f" (tokens, mask) pair, got {type(prompts).__name__}.")
  if not rows:
    raise ValueError("prompts is empty: give at least one prompt.")
  for i, row in enumerate(rows):
    if row.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token (e.g. BOS).")
    _check_ids(row, vocab_size, f"prompt {i}")
  return rows


def batch_bucket(batch: int) -> int:
  """The padded batch size: the next power of two (1, 2, 4, 8, ...)."""
  return 1 << max(batch - 1, 0).bit_length()


#: The smallest prompt length bucket of the default (power-of-two) bucketing.
MIN_LENGTH_BUCKET = 16


def length_bucket(length: int, bucket: int | None = None) -> int:
  """The padded prompt length: ``length`` rounded up to a multiple of ``bucket``, or, when
  ``bucket`` is ``None``, to the next power of two of at least :data:`MIN_LENGTH_BUCKET` (at
  most 2x the work of the longest prompt, and one compilation per octave of lengths)."""
  if bucket is None:
    return max(MIN_LENGTH_BUCKET, 1 << max(length - 1, 0).bit_length())
  return -(-length // bucket) * bucket


# ------------------------------------------------------------------------------------------------
# The jitted program

#: (config, batch, prompt_len, cache_len, max_new_tokens, static options) -> jitted function.
_JITTED: dict[tuple, Any] = {}


def compile_count() -> int:
  """Number of executables compiled by :func:`generate` so far in this process.

  One per shape bucket and static options (and per parameter sharding / dtype seen), e.g.
  ``compile_count()`` before and after a call tells whether it compiled.
  """
  return sum(fn._cache_size() for fn in _JITTED.values())  # pylint: disable=protected-access


def _choose(logits, step, key, temperature, top_p, min_p, *, greedy, top_k, use_top_p,
            use_min_p):
  """Next tokens ``[B]`` and their log-probs under ``log_softmax(logits)``."""
  if greedy:
    tok = jnp.argmax(logits, axis=-1)
  else:
    z = filter_logits(logits / temperature, top_k=top_k, top_p=top_p if use_top_p else 1.0,
                      min_p=min_p if use_min_p else 0.0)
    tok = jax.random.categorical(jax.random.fold_in(key, step), z, axis=-1)
  tok = tok.astype(jnp.int32)
  # log_softmax at the chosen token only: one reduction, no [B, V] log-probs array.
  chosen = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
  return tok, chosen - jax.nn.logsumexp(logits, axis=-1)


def _build(config: ModelConfig, cache_len: int, max_new_tokens: int, return_logits: bool,
           **choose_opts):
  """The jitted ``(params, tokens, mask, done, stops, key, temperature, top_p, min_p,
  pad_id)``; ``stops`` is an int32 array of stop ids padded with -1."""
  n = max_new_tokens

  def record(state, step, tok, lp, logits, pad_id, stops):
    alive = ~state["done"]
    upd = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buf, col[:, None].astype(buf.dtype), step, axis=1)
    state = dict(state)
    state["tokens"] = upd(state["tokens"], jnp.where(alive, tok, pad_id))
    state["logprobs"] = upd(state["logprobs"], jnp.where(alive, lp, 0.0))
    if return_logits:
      state["logits"] = jax.lax.dynamic_update_slice_in_dim(
          state["logits"], jnp.where(alive[:, None], logits, 0.0)[:, None], step, axis=1)
    state["lengths"] = state["lengths"] + alive.astype(jnp.int32)
    state["done"] = state["done"] | jnp.any(tok[:, None] == stops[None, :], axis=1)
    state["last"] = tok
    state["step"] = step + 1
    return state

  def run(params, tokens, mask, done, stops, key, temperature, top_p, min_p, pad_id):
    b = tokens.shape[0]
    choose = lambda logits, step: _choose(  # noqa: E731
        logits, step, key, temperature, top_p, min_p, **choose_opts)
    # Prefill: the whole prompt at once, through the model's own cached apply.
    out = transformer.apply(params, tokens, config=config, attention_mask=mask,
                            cache=transformer.init_cache(config, b, cache_len),
                            return_logits=False)
    head = transformer.output_head(params, config)
    logits = jnp.dot(out.hidden[:, -1].astype(jnp.float32), head.astype(jnp.float32))
    state = {"cache": from_model_cache(out.cache, config), "done": done,
             "lengths": jnp.zeros((b,), jnp.int32), "tokens": jnp.zeros((b, n), jnp.int32),
             "logprobs": jnp.zeros((b, n), jnp.float32)}
    if return_logits:
      state["logits"] = jnp.zeros((b, n, config.vocab_size), jnp.float32)
    tok, lp = choose(logits, 0)
    state = record(state, jnp.int32(0), tok, lp, logits, pad_id, stops)
    # Per-layer weights, copied once per call (jkd.sampling.decode). On XLA:CPU they are [out,
    # in] and a barrier keeps them materialised in that layout (XLA would otherwise fold the
    # transposes back into the products); elsewhere they keep the model's layout, no barrier.
    layers, head = prepare_layers(params, config), prepare_head(params, config)
    if runtime.xla_cpu():
      layers, head = jax.lax.optimization_barrier((layers, head))

    def cond(state):
      return (state["step"] < n) & ~jnp.all(state["done"])

    def body(state):
      logits, cache = decode_step(params, layers, head, state["last"], state["cache"], config)
      tok, lp = choose(logits, state["step"])
      return record(dict(state, cache=cache), state["step"], tok, lp, logits, pad_id, stops)

    state = jax.lax.while_loop(cond, body, state)
    return (state["tokens"], state["lengths"], state["logprobs"],
            state["logits"] if return_logits else None)

  return jax.jit(run)


def _jitted(key: tuple, **build_args):
  fn = _JITTED.get(key)
  if fn is None:
    fn = _JITTED[key] = _build(**build_args)
  return fn


# ------------------------------------------------------------------------------------------------
# generate


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")


def _check_sampling_options(*, max_new_tokens, bucket, pad_id, greedy, temperature, key, top_k,
                            top_p, min_p) -> None:
  """Raises ``ValueError`` for :func:`generate` options out of range (before any prompt work)."""
  _check_int("max_new_tokens", max_new_tokens, 1)
  if bucket is not None:
    _check_int("bucket", bucket, 1)
  _check_int("pad_id", pad_id, -2**31)
  if not greedy:
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
      raise ValueError(f"temperature must be > 0, got {temperature!r}; for argmax decoding pass"
                       " greedy=True.")
    if key is None:
      raise ValueError("sampling needs a key (jax.random.key(seed)); pass greedy=True to decode"
                       " without one.")
  check_filters(top_k=top_k, top_p=top_p, min_p=min_p)


def _stop_set(stop_ids: Sequence[int], eos_id: int | None, vocab: int) -> list[int]:
  """The sorted stop ids (``stop_ids`` and ``eos_id``), each checked to be in the vocabulary."""
  stop_set = sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set()))
  for s in stop_set:
    if not 0 <= s < vocab:
      raise ValueError(f"stop id {s} (eos_id / stop_ids) is outside the vocabulary [0, {vocab}).")
  return stop_set


def _lengths(longest: int, max_new_tokens: int, config: ModelConfig, bucket: int | None,
             cache_len: int | None) -> tuple[int, int]:
  """``(prompt_len, cache_len)``: the bucketed prompt length and the KV-cache slots, checked to
  hold the longest prompt + ``max_new_tokens``."""
  if longest + max_new_tokens > config.max_position_embeddings:
    raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})"
                     f" exceeds the model's max_position_embeddings"
                     f" ({config.max_position_embeddings}); shorten the prompt or generate less.")
  prompt_len = length_bucket(longest, bucket)
  if cache_len is None:
    cache_len = prompt_len + max_new_tokens
  else:
    _check_int("cache_len", cache_len, 1)
    if longest + max_new_tokens > cache_len:
      raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens"
                       f" ({max_new_tokens}) exceeds cache_len ({cache_len}); pass a larger"
                       " cache_len or generate less.")
    prompt_len = min(prompt_len, cache_len - max_new_tokens)
  return prompt_len, cache_len


def _left_pad(rows: Sequence[np.ndarray], prompt_len: int) -> tuple[np.ndarray, ...]:
  """``(tokens, mask, done)``: the prompts left-padded to ``prompt_len``, and the batch padded
  up to :func:`batch_bucket` rows with rows of one real token that are already stopped."""
  b = len(rows)
  bb = batch_bucket(b)
  tokens = np.zeros((bb, prompt_len), np.int32)
  mask = np.zeros((bb, prompt_len), bool)
  for i, row in enumerate(rows):
    tokens[i, prompt_len - len(row):] = row
    mask[i, prompt_len - len(row):] = True
  mask[b:, -1] = True  # batch padding: one real token, already stopped
  done = np.arange(bb) >= b
  return tokens, mask, done


def _program(config: ModelConfig, batch: int, prompt_len: int, cache_len: int,
             max_new_tokens: int, return_logits: bool, *, greedy: bool, top_k: int,
             top_p: float, min_p: float):
  """The (cached) jitted program for these bucketed shapes and static options."""
  opts = dict(greedy=bool(greedy), top_k=0 if greedy else int(top_k),
              use_top_p=not greedy and top_p < 1.0, use_min_p=not greedy and min_p > 0.0)
  cache_key = (config, batch, prompt_len, cache_len, max_new_tokens, bool(return_logits),
               tuple(sorted(opts.items())),
               partitioning.context_key(),  # Traced with that mesh's constraints, if any,
               runtime.xla_cpu())  # and with the decode step's forms for this backend.
  return _jitted(cache_key, config=config, cache_len=cache_len, max_new_tokens=max_new_tokens,
                 return_logits=bool(return_logits), **opts)


def generate(params: PyTree, prompts, *, config: ModelConfig, key: Array | None,
             max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, greedy: bool = False,
             eos_id: int | None = None, stop_ids: Sequence[int] = (), pad_id: int = 0,
             cache_len: int | None = None, bucket: int | None = None,
             return_logits: bool = False) -> SampleOutput:
  """Samples continuations of a batch of prompts (KV-cached, one XLA program).

  Each step draws ``token ~ softmax(filter_logits(logits / temperature, top_k, top_p, min_p))``
  (or ``argmax(logits)`` when ``greedy``) with the key ``fold_in(key, step)``: a given key gives
  the same tokens on every run. A sequence stops after ``eos_id`` or any of ``stop_ids`` (the
  stop token is kept and counted) or after ``max_new_tokens``; the loop ends when all have
  stopped.

  Prompts are left-padded to a power-of-two length (at least 16; or to a multiple of ``bucket``
  tokens) and the batch to a power of two, so calls whose shapes fall in the same bucket share
  one compilation (:func:`compile_count`).
  Padding is masked out, and RoPE positions count real tokens only, so the result of a prompt
  does not depend on the padding around it.

  Args:
    params: model parameters (any sharding: the program follows it).
    prompts: a list of token-id lists of any lengths, a ``[B, T]`` int array, or a
      ``([B, T] tokens, [B, T] mask)`` pair (mask 1 on real tokens; padding on either side).
    config: the model's :class:`~jkd.models.ModelConfig`.
    key: a ``jax.random`` key (may be ``None`` when ``greedy``).
    max_new_tokens: most new tokens per sequence.
    temperature: softmax temperature, ``> 0`` (ignored when ``greedy``).
    top_k, top_p, min_p: filters, see :func:`filter_logits` (ignored when ``greedy``).
    greedy: take the most likely token at each step.
    eos_id: end-of-sequence id (``None``: none).
    stop_ids: more ids that end a sequence.
    pad_id: the value written after a sequence's stop token.
    cache_len: KV-cache slots; default the bucketed prompt length + ``max_new_tokens``. When
      given, the longest prompt + ``max_new_tokens`` must fit in it.
    bucket: prompt lengths are padded up to a multiple of this; ``None`` (default): to the next
      power of two, at least :data:`MIN_LENGTH_BUCKET` (:func:`length_bucket`).
    return_logits: also return the raw logits of every step (``[B, max_new_tokens, vocab]``).

  Returns:
    :class:`SampleOutput` with ``tokens``, ``lengths``, ``logprobs``, ``prompt_lengths`` (and
    ``logits``).
  """
  _check_sampling_options(max_new_tokens=max_new_tokens, bucket=bucket, pad_id=pad_id,
                          greedy=greedy, temperature=temperature, key=key, top_k=top_k,
                          top_p=top_p, min_p=min_p)
  stop_set = _stop_set(stop_ids, eos_id, config.vocab_size)
  rows = prompt_rows(prompts, config.vocab_size)
  prompt_len, cache_len = _lengths(max(len(r) for r in rows), max_new_tokens, config, bucket,
                                   cache_len)
  tokens, mask, done = _left_pad(rows, prompt_len)
  # Stop ids are data (padded with -1, which no token equals) in a bucket of 8, 16, ...
  stops = np.full(max(8, batch_bucket(len(stop_set))), -1, np.int32)
  stops[:len(stop_set)] = stop_set
  fn = _program(config, tokens.shape[0], prompt_len, cache_len, max_new_tokens, return_logits,
                greedy=greedy, top_k=top_k, top_p=top_p, min_p=min_p)
  if key is None:
    key = jax.random.key(0)
  f32 = np.float32
  out_tokens, lengths, logprobs, logits = fn(
      params, tokens, mask, done, stops, key, f32(1.0 if greedy else temperature), f32(top_p),
      f32(min_p), np.int32(pad_id))
  b = len(rows)
  return SampleOutput(tokens=out_tokens[:b], lengths=lengths[:b], logprobs=logprobs[:b],
                      prompt_lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
                      logits=None if logits is None else logits[:b])
