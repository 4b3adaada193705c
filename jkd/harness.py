"""EleutherAI's lm-evaluation-harness (``lm-eval``) on jkd models, in JAX (no PyTorch).

:class:`JkdLM` is an ``lm_eval`` model registered as ``"jkd"``. It loads any model spec of
:mod:`jkd.data.model_spec` (``smollm2``, ``hf:DIR``, ``gguf:FILE``, ``random:{...}``) and answers
the harness's three request types:

* ``loglikelihood``: the summed log-probability of a continuation given a context, and whether
  it is the greedy continuation (every token the argmax);
* ``loglikelihood_rolling``: the log-likelihood of a whole document in the harness's disjoint
  windows of ``max_length`` tokens (``lm_eval.utils.get_rolling_token_windows``);
* ``generate_until``: greedy (or sampled) generation with jkd's KV-cached sampler, cut at the
  ``until`` strings, at most ``max_gen_toks`` new tokens.

Tokenization is the harness's Hugging Face model's (``HFLM``): context and continuation are
encoded whole and split at the length of the encoded context (``TemplateLM._encode_pair``, which
also moves the context's trailing spaces to the continuation); an empty context becomes the BOS
token (the EOS token when there is none); inputs longer than ``max_length`` lose tokens on the
left. Scores are float32 and match ``HFLM`` on the same model (``tests/test_harness.py``).

Requests are sorted by length and scored in batches of ``batch_size``, padded to power-of-two
lengths (at least 16, at most ``max_length``) and batch sizes, so the jitted scorer compiles once
per bucket, not per request.

Command line (``python -m jkd.harness`` is ``lm-eval`` with this model registered)::

  python -m jkd.harness run --model jkd --model_args model=hf:/runs/student/export \\
      --tasks hellaswag,arc_easy --batch_size 8

Python::

  import lm_eval
  from jkd.harness import JkdLM
  results = lm_eval.simple_evaluate(model=JkdLM(model="smollm2"), tasks=["arc_easy"])

Not supported: ``batch_size=auto``, several processes (``world_size`` is 1; the model runs on
JAX's default device, whatever ``device`` says), multimodal and seq2seq models. See
``docs/harness.md``.
"""

from __future__ import annotations

import functools
import json
import numbers
import sys
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (the harness's own models, before ours: see below)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from jkd import models, sampling
from jkd.data import model_spec

# lm_eval's registry imports its own models only while it is empty: ``lm_eval.models`` is
# imported above so that registering "jkd" does not hide "hf", "vllm", ... in this process.

#: The model arguments :class:`JkdLM` takes (``--model_args``).
MODEL_ARGS = ("model", "batch_size", "max_length", "dtype", "max_gen_toks", "add_bos_token",
              "seed")

#: Arguments the harness passes to every model (``--device``, ``--max_batch_size``); jkd runs
#: on JAX's default device and takes no automatic batch size, so they are accepted and unused.
IGNORED_ARGS = ("device", "max_batch_size")

#: Generation options of a task's ``generation_kwargs`` that :meth:`JkdLM.generate_until` reads.
GENERATION_OPTIONS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p",
                      "min_p")

#: The shortest padded length of a batch of scored sequences.
MIN_LENGTH_BUCKET = 16


def _positive_int(name: str, value) -> int:
  """``value`` as an int >= 1 (ints and digit strings, as ``--model_args`` gives them)."""
  if isinstance(value, str) and value.strip().isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    hint = " (automatic batch sizes are not supported)" if str(value).startswith("auto") else ""
    raise ValueError(f"{name} must be an int >= 1, got {value!r}{hint}; pass e.g."
                     f" {name}=8.")
  return int(value)


def _length_bucket(length: int, max_length: int) -> int:
  """Padded sequence length: the next power of two, at least 16, at most ``max_length``."""
  return min(max(MIN_LENGTH_BUCKET, 1 << max(length - 1, 0).bit_length()), max_length)


@functools.partial(jax.jit, static_argnames=("config",))
def score_tokens(params, tokens: jax.Array, mask: jax.Array, targets: jax.Array,
                 weights: jax.Array, *, config: models.ModelConfig):
  """Summed log-probabilities of ``targets`` where ``weights``, and whether all are the argmax.

  Args:
    params, config: the model.
    tokens: ``[B, T]`` int32 inputs, right-padded.
    mask: ``[B, T]`` bool, True on real tokens.
    targets: ``[B, T]`` int32 next tokens (``tokens`` shifted left by one).
    weights: ``[B, T]`` bool, True where a target is scored.

  Returns:
    ``([B] float32 sum of log softmax(logits)[target], [B] bool all targets are the argmax)``.
  """
  logits = models.apply(params, tokens, config=config, attention_mask=mask).logits
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
  total = jnp.sum(jnp.where(weights, logprobs, 0.0), axis=1)
  greedy = jnp.all(jnp.where(weights, jnp.argmax(logits, axis=-1) == targets, True), axis=1)
  return total, greedy


@register_model("jkd")
class JkdLM(TemplateLM):
  """A jkd model (teacher or student) as an ``lm_eval`` model; see the module docstring.

  Args:
    model: a model spec (:func:`jkd.data.model_spec.load_model`): ``smollm2``, ``hf:DIR``,
      ``gguf:FILE`` or ``random:{json}``.
    batch_size: sequences per forward pass (an int; ``auto`` is not supported).
    max_length: longest input in tokens (default: the model's ``max_position_embeddings``);
      longer inputs lose tokens on the left, as in the harness's Hugging Face model.
    dtype: compute dtype, ``float32`` or ``bfloat16`` (default: the model's, float32).
    max_gen_toks: default most new tokens of ``generate_until`` (a task may set its own).
    add_bos_token: add the tokenizer's special tokens (BOS) when encoding; ``None`` (default):
      the tokenizer's own choice.
    seed: seed of ``generate_until`` when a task samples (``do_sample=True``).
    device, max_batch_size: passed by the harness to every model; unused (JAX's default device).

  Raises:
    ValueError: an unknown argument, a bad spec or value (the message says what to pass).
  """

  def __init__(self, model: str | None = None, batch_size: int | str = 8,
               max_length: int | None = None, dtype: str | None = None,
               max_gen_toks: int = 256, add_bos_token: bool | None = None, seed: int = 1234,
               **kwargs):
    super().__init__()
    unknown = sorted(set(kwargs) - set(IGNORED_ARGS))
    if unknown:
      raise ValueError(f"unknown model_args {unknown} for the 'jkd' model; it takes"
                       f" {list(MODEL_ARGS)}.")
    if not isinstance(model, str) or not model:
      raise ValueError("the 'jkd' model needs model=SPEC in model_args, e.g."
                       " model=smollm2, model=hf:/path/to/export or model=gguf:/path/file.gguf.")
    model_spec.parse_spec(model)  # A bad spec fails before anything is loaded.
    self.batch_size = _positive_int("batch_size", batch_size)
    self._max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
      raise ValueError(f"seed must be an int, got {seed!r}.")
    self.seed = int(seed)
    if add_bos_token is not None and not isinstance(add_bos_token, bool):
      raise ValueError(f"add_bos_token must be true, false or None, got {add_bos_token!r}.")
    self.add_bos_token = add_bos_token
    if dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    loaded = model_spec.load_model(model)
    self.spec, self.params, self.tokenizer = model, loaded.params, loaded.tokenizer
    self.config = loaded.config if dtype is None else loaded.config.replace(dtype=dtype)
    limit = self.config.max_position_embeddings
    self._max_length = limit if max_length is None else _positive_int("max_length", max_length)
    if self._max_length > limit:
      raise ValueError(f"max_length {self._max_length} exceeds the model's"
                       f" max_position_embeddings ({limit}); pass max_length <= {limit}.")
    if self.tokenizer.eos_token_id is None:
      raise ValueError(f"the tokenizer of {model!r} has no EOS token, which the harness uses to"
                       " end generations and to score an empty context; save one with it.")
    self._prefix_text = self.tokenizer.decode([self.prefix_token_id])
    self._vocab_texts: list[str] | None = None

  # ----------------------------------------------------------------------------------------------
  # What the harness reads

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    """The token an empty context becomes: BOS, else EOS (as the harness's ``HFLM``)."""
    bos = self.tokenizer.bos_token_id
    return self.eot_token_id if bos is None else bos

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "name_or_path", "") or self.spec).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    """Token ids of ``string``; special tokens as ``HFLM``: ``add_special_tokens`` if given,
    else ``add_bos_token`` if set, else the tokenizer's default, and none when ``string``
    already starts with the prefix token's text."""
    if add_special_tokens is None:
      add_special_tokens = self.add_bos_token
      if string.startswith(self._prefix_text):
        add_special_tokens = False
    options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    return list(self.tokenizer.encode(string, **options))

  def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template rendered as text (``--apply_chat_template``)."""
    return self.tokenizer.apply_chat_template(
        chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt)

  # ----------------------------------------------------------------------------------------------
  # Scoring

  def _batches(self, order: Sequence[int], desc: str, disable: bool) -> Iterable[list[int]]:
    bar = tqdm(total=len(order), desc=desc, disable=disable)
    for start in range(0, len(order), self.batch_size):
      chunk = list(order[start:start + self.batch_size])
      yield chunk
      bar.update(len(chunk))
    bar.close()

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` per ``(key, context_ids,
    continuation_ids)`` request; the input is the last ``max_length`` tokens of context +
    continuation (without the final token)."""
    rows = []
    for i, (_, context, continuation) in enumerate(requests):
      if not continuation:
        raise ValueError(f"request {i} has an empty continuation: there is nothing to score.")
      if len(continuation) > self.max_length:
        raise ValueError(f"request {i}: its continuation has {len(continuation)} tokens, more"
                         f" than max_length ({self.max_length}); pass a larger max_length.")
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole, len(continuation)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for chunk in self._batches(order, "jkd loglikelihood", disable_tqdm):
      length = _length_bucket(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
      b = min(sampling.batch_bucket(len(chunk)), self.batch_size)
      tokens = np.zeros((b, length), np.int32)
      targets = np.zeros((b, length), np.int32)
      mask = np.zeros((b, length), bool)
      weights = np.zeros((b, length), bool)
      for r, i in enumerate(chunk):
        whole, scored = rows[i]
        n = len(whole) - 1
        tokens[r, :n], targets[r, :n], mask[r, :n] = whole[:-1], whole[1:], True
        weights[r, n - scored:n] = True
      total, greedy = jax.device_get(score_tokens(self.params, tokens, mask, targets, weights,
                                                  config=self.config))
      for r, i in enumerate(chunk):
        results[i] = (float(total[r]), bool(greedy[r]))
        if requests[i][0] is not None:  # (context, continuation); None for rolling windows
          self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole document (``Instance.args == (text,)``), scored in the
    harness's disjoint windows of ``max_length`` tokens, the first one after the prefix token."""
    windows, owners = [], []
    for n, request in enumerate(requests):
      (text,) = request.args
      for context, continuation in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(n)
    totals = [0.0] * len(requests)
    for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[n] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # ----------------------------------------------------------------------------------------------
  # Generation

  def _stop_ids(self, until: Sequence[str]) -> list[int]:
    """Ids of the tokens whose text contains a stop string: generation may end at them, since
    the text is then cut at that string anyway (stop strings across tokens are cut too, but
    only after ``max_gen_toks`` or EOS)."""
    if self._vocab_texts is None:
      vocab = min(len(self.tokenizer), self.config.vocab_size)
      self._vocab_texts = self.tokenizer.batch_decode([[i] for i in range(vocab)],
                                                      skip_special_tokens=True)
    stops = [s for s in until if s]
    return [i for i, text in enumerate(self._vocab_texts) if any(s in text for s in stops)]

  def _generation_options(self, gen_kwargs: dict) -> dict[str, Any]:
    if not isinstance(gen_kwargs, dict):
      raise ValueError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}.")
    unknown = sorted(set(gen_kwargs) - set(GENERATION_OPTIONS) - {
        "max_new_tokens", "max_tokens", "max_completion_tokens"})
    if unknown:
      raise ValueError(f"generation options {unknown} are not supported by the 'jkd' model; it"
                       f" reads {list(GENERATION_OPTIONS)}. Remove them from the task's"
                       " generation_kwargs (or --gen_kwargs).")
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
    max_gen = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks"))
    if max_gen >= self.max_length:
      raise ValueError(f"max_gen_toks ({max_gen}) must be less than max_length"
                       f" ({self.max_length}): the prompt needs room.")
    temperature = float(kwargs.get("temperature") or 0.0)
    greedy = not kwargs.get("do_sample") or temperature <= 0.0
    return dict(until=until, max_gen=max_gen, greedy=greedy,
                temperature=1.0 if greedy else temperature,
                top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                min_p=float(kwargs.get("min_p") or 0.0))

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of ``Instance.args == (context, gen_kwargs)``: greedy unless
    ``do_sample`` (with ``temperature > 0``), ended by EOS, a token containing an ``until``
    string or ``max_gen_toks`` tokens, decoded without special tokens and cut before the first
    ``until`` string. The context keeps its last ``max_length - max_gen_toks`` tokens."""
    groups: dict[str, list[int]] = {}
    for n, request in enumerate(requests):
      key = json.dumps(request.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(n)
    results = [""] * len(requests)
    counter = 0
    for members in groups.values():
      opts = self._generation_options(requests[members[0]].args[1])
      stop_ids = self._stop_ids(opts["until"])
      max_context = self.max_length - opts["max_gen"]
      prompts = {}
      for n in members:
        ids = self.tok_encode(requests[n].args[0])[-max_context:]
        prompts[n] = ids or [self.prefix_token_id]
      order = sorted(members, key=lambda n: -len(prompts[n]))
      for chunk in self._batches(order, "jkd generate_until", disable_tqdm):
        key = jax.random.fold_in(jax.random.key(self.seed), counter)
        counter += 1
        out = sampling.generate(
            self.params, [prompts[n] for n in chunk], config=self.config, key=key,
            max_new_tokens=opts["max_gen"], greedy=opts["greedy"],
            temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
            min_p=opts["min_p"], eos_id=self.eot_token_id, stop_ids=stop_ids)
        tokens, lengths = jax.device_get((out.tokens, out.lengths))
        for r, n in enumerate(chunk):
          text = self.tok_decode(tokens[r, :lengths[r]].tolist())
          results[n] = postprocess_generated_text(text, opts["until"], None)
          self.cache_hook.add_partial("generate_until", requests[n].args, results[n])
    return results


def main(argv: Sequence[str] | None = None) -> None:
  """``lm-eval``'s command line with the ``jkd`` model registered (``python -m jkd.harness``)."""
  from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415
  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
