"""ARTE's ranking signal: how much the student learns from each draft the teacher writes.

ARTE (Liu et al., "Aligning Teacher with Student Preferences for Tailored Training Data
Generation", arXiv 2406.19227, 2024) has the teacher draft training examples, ranks the drafts
by the student's response to each, and preference-optimises the teacher (DPO) on the ranking
before it writes the final corpus. The paper measures the student's response by its one-shot
in-context-learning accuracy on a validation set with the draft as the demonstration; a small
or random student cannot learn in context, so jkd measures what the student *learns* from the
draft by training on it: the drop in its validation NLL after ``k`` SGD steps on the draft
(:func:`lookahead_gains`, all drafts of a chunk in one vmapped, jitted function). The best and
the worst draft of each prompt make a (chosen, rejected) pair (:func:`rank_drafts`).
:mod:`jkd.train.sources.arte` runs the whole pipeline in the engine.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd import models
from jkd.losses import IGNORE_INDEX

PyTree = Any
Batch = Mapping[str, jax.Array]
#: The arrays of a draft or validation batch (``loss_mask`` optional).
FIELDS = ("tokens", "labels", "loss_mask")


def mean_nll(params: PyTree, batch: Batch, *, config: models.ModelConfig) -> jax.Array:
  r"""Token-weighted mean negative log-likelihood of a batch under a jkd model.

  .. math:: L(\theta; B) = -\frac{1}{|M|} \sum_{(n,t) \in M} \log p_\theta(y_{n,t} \mid
     x_{n,\le t})

  with ``M`` the positions where ``loss_mask`` is True and ``labels != -100`` (0 when ``M`` is
  empty). Float32 compute.

  Args:
    params, config: the model.
    batch: ``tokens``, ``labels`` ``[B, T]`` int and optionally ``loss_mask`` ``[B, T]`` bool.

  Returns:
    A float32 scalar.
  """
  tokens, labels = batch["tokens"], batch["labels"]
  mask = labels != IGNORE_INDEX
  if "loss_mask" in batch:
    mask = mask & batch["loss_mask"].astype(bool)
  logits = models.apply(params, tokens, config=config).logits
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(mask, picked, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def lookahead_gains(loss_fn: Callable[[PyTree, Batch], jax.Array], params: PyTree,
                    drafts: Batch, validation: Batch, *, lr: float | jax.Array,
                    steps: int = 1) -> jax.Array:
  r"""The drop in validation loss after ``steps`` SGD steps on each draft alone.

  .. math::
     g_i = L(\theta_0; V) - L(\theta_k^{(i)}; V), \qquad
     \theta_{j+1}^{(i)} = \theta_j^{(i)} - \eta \nabla_\theta \ell(\theta_j^{(i)}; d_i),
     \quad \theta_0^{(i)} = \theta_0

  where ``loss_fn`` gives both the draft loss ``\ell`` and the validation loss ``L``. For a
  small ``\eta`` and one step, ``g_i \approx \eta \langle \nabla L(\theta_0; V), \nabla
  \ell(\theta_0; d_i) \rangle`` (the draft's influence); the exact look-ahead used here also
  counts the curvature. The drafts are vmapped: the memory holds ``N`` copies of the
  parameters and their gradients, so callers chunk large sets (:func:`student_gains`).

  Args:
    loss_fn: ``(params, batch) -> scalar`` mean loss of a ``[B, ...]`` batch.
    params: the student's parameters ``\theta_0`` (float32 leaves).
    drafts: ``{name: [N, ...]}``; draft ``i`` is given to ``loss_fn`` as a batch of one.
    validation: a ``{name: [M, ...]}`` batch from the target distribution.
    lr: the SGD step size ``\eta``.
    steps: ``k >= 1``.

  Returns:
    ``[N]`` float32 gains (positive: the draft teaches the student something the validation
    set rewards).

  >>> loss = lambda w, b: jnp.mean((w - b["x"]) ** 2)
  >>> g = lookahead_gains(loss, jnp.zeros(()), {"x": jnp.array([1.0, -1.0])},
  ...                     {"x": jnp.array([1.0])}, lr=0.25)
  >>> [round(float(v), 4) for v in g]  # w -> 0.5 (loss 0.25) or -0.5 (loss 2.25); base 1.0
  [0.75, -1.25]
  """
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an int >= 1 (SGD steps on each draft), got {steps!r}.")
  base = loss_fn(params, validation)
  grad = jax.grad(loss_fn)

  def one(draft):
    batch = jax.tree.map(lambda x: x[None], draft)
    updated = params
    for _ in range(int(steps)):  # A few steps: unrolled.
      g = grad(updated, batch)
      updated = jax.tree.map(lambda w, d: w - jnp.asarray(lr, w.dtype) * d.astype(w.dtype),
                             updated, g)
    return base - loss_fn(updated, validation)

  return jax.vmap(one)(drafts)


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def _chunk_gains(params, drafts, validation, lr, *, config, steps):
  return lookahead_gains(functools.partial(mean_nll, config=config), params, drafts,
                         validation, lr=lr, steps=steps)


def _as_examples(examples: Mapping[str, Any], vocab: int, what: str) -> dict[str, np.ndarray]:
  if not isinstance(examples, Mapping) or "tokens" not in examples or "labels" not in examples:
    have = sorted(examples) if isinstance(examples, Mapping) else type(examples).__name__
    raise ValueError(f"{what} need 'tokens' and 'labels' [N, T] arrays ('loss_mask'"
                     f" optional); got {have}.")
  tokens, labels = np.asarray(examples["tokens"]), np.asarray(examples["labels"])
  mask = np.asarray(examples.get("loss_mask", np.ones(labels.shape, bool)))
  if tokens.ndim != 2 or labels.shape != tokens.shape or mask.shape != tokens.shape:
    raise ValueError(f"{what}: tokens, labels and loss_mask must be [N, T] arrays of one shape;"
                     f" got {tokens.shape}, {labels.shape}, {mask.shape}.")
  if len(tokens) == 0:
    raise ValueError(f"{what} are empty (N = 0): ARTE needs at least one example there.")
  mask = mask.astype(bool) & (labels != IGNORE_INDEX)
  for name, ids in (("tokens", tokens), ("labels", labels[mask])):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"{what}: {name} hold ids outside the student's vocabulary [0, {vocab})"
                       f" (min {ids.min()}, max {ids.max()}): tokenize with its tokenizer.")
  if not mask.any():
    raise ValueError(f"{what} have no counted token (loss_mask False or labels -100"
                     " everywhere): the loss is undefined.")
  return {"tokens": tokens.astype(np.int32), "labels": np.where(mask, labels, 0).astype(np.int32),
          "loss_mask": mask}


def student_gains(params: PyTree, config: models.ModelConfig, drafts: Mapping[str, Any],
                  validation: Mapping[str, Any], *, lr: float, steps: int = 1,
                  batch_size: int = 8) -> np.ndarray:
  r"""ARTE's ranking signal for a jkd student: :func:`lookahead_gains` with :func:`mean_nll`.

  Drafts are scored ``batch_size`` at a time by one jitted, vmapped function (the last chunk
  is padded with drafts of no counted token, whose gain is 0, so every chunk shares one
  compilation); the validation set is one batch.

  Args:
    params, config: the initial student.
    drafts: ``{"tokens", "labels", "loss_mask"?}`` ``[N, T]`` arrays, one row per draft
      (e.g. :func:`jkd.data.tokenize_example` of each prompt/completion, padded).
    validation: the same arrays ``[M, T']`` from the target distribution.
    lr: the look-ahead SGD step size, ``> 0``.
    steps: SGD steps per draft.
    batch_size: drafts per vmapped call (memory: ``batch_size`` copies of the parameters and
      their gradients).

  Returns:
    ``[N]`` float64 gains (computed in float32).

  Raises:
    ValueError: an empty or mis-shaped draft or validation set, a draft with no counted token,
      ids outside the vocabulary, or a bad ``lr``/``steps``/``batch_size``.
  """
  if not isinstance(lr, (int, float, np.floating)) or not np.isfinite(lr) or lr <= 0:
    raise ValueError(f"the look-ahead lr must be a positive finite number (got {lr!r}).")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int (got {batch_size!r}).")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an int >= 1 (SGD steps on each draft), got {steps!r}.")
  validation = _as_examples(validation, config.vocab_size, "the validation examples")
  drafts = _as_examples(drafts, config.vocab_size, "the drafts")
  empty = np.flatnonzero(~drafts["loss_mask"].any(axis=1))
  if empty.size:
    raise ValueError(f"draft(s) {empty[:5].tolist()} have no counted token (an empty"
                     " completion, or one cut off by data.seq_len): drop them before scoring.")
  n = len(drafts["tokens"])
  chunk = min(int(batch_size), n)
  padded = -(-n // chunk) * chunk
  drafts = {k: np.concatenate([v, np.zeros((padded - n,) + v.shape[1:], v.dtype)])
            for k, v in drafts.items()}
  out = []
  for i in range(0, padded, chunk):
    part = {k: v[i:i + chunk] for k, v in drafts.items()}
    out.append(np.asarray(_chunk_gains(params, part, validation, np.float32(lr), config=config,
                                       steps=int(steps)), np.float64))
  return np.concatenate(out)[:n]


class DraftPairs(NamedTuple):
  """The (chosen, rejected) drafts of each ranked prompt (:func:`rank_drafts`).

  Attributes:
    chosen, rejected: ``[P]`` int indices into the drafts.
    groups: ``[P]`` the prompt (group label) of each pair.
    skipped: the prompts whose drafts all scored within ``min_gap`` of each other.
  """
  chosen: np.ndarray
  rejected: np.ndarray
  groups: list
  skipped: list


def rank_drafts(groups: Sequence[Hashable], scores: Any, *, min_gap: float = 0.0) -> DraftPairs:
  r"""Best and worst draft of each prompt: ARTE's preference pairs.

  For each prompt ``q`` with drafts ``D_q`` (at least two) the pair is
  ``(\arg\max_{i \in D_q} s_i, \arg\min_{i \in D_q} s_i)`` (the first draft on ties); a prompt
  whose best and worst scores differ by ``<= min_gap`` gives no pair (it is listed in
  ``skipped``). Pairs come in the order of the prompts' first drafts.

  Args:
    groups: ``[N]`` the prompt (any hashable label) of each draft.
    scores: ``[N]`` finite scores, higher is preferred (e.g. :func:`student_gains`).
    min_gap: the smallest best-minus-worst difference that makes a pair, ``>= 0``.

  Returns:
    :class:`DraftPairs`.

  Raises:
    ValueError: no drafts, lengths that differ, scores that are not a ranking (NaN or
      infinite), a prompt with fewer than two drafts, or a negative ``min_gap``.

  >>> p = rank_drafts(["a", "a", "b", "b", "b"], [0.1, 0.3, -1.0, 2.0, 0.5])
  >>> p.chosen.tolist(), p.rejected.tolist(), p.groups
  ([1, 3], [0, 2], ['a', 'b'])
  """
  scores = np.asarray(scores, np.float64)
  groups = list(groups)
  if scores.ndim != 1 or len(groups) != scores.shape[0]:
    raise ValueError(f"groups ({len(groups)}) and scores {scores.shape} must be one [N] entry"
                     " per draft.")
  if not groups:
    raise ValueError("no drafts to rank: the teacher wrote none (check the prompts and"
                     " arte.n).")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise ValueError(f"scores {scores[bad[:5]].tolist()} of draft(s) {bad[:5].tolist()} are"
                     " not finite, so the drafts have no ranking: lower arte.lookahead_lr"
                     " (a diverged look-ahead step) or drop those drafts.")
  if not np.isfinite(min_gap) or min_gap < 0:
    raise ValueError(f"min_gap must be >= 0 (got {min_gap!r}).")
  members: dict[Hashable, list[int]] = {}
  for i, g in enumerate(groups):
    members.setdefault(g, []).append(i)
  few = [g for g, idx in members.items() if len(idx) < 2]
  if few:
    raise ValueError(f"prompt(s) {few[:5]} have a single draft: ARTE ranks at least two"
                     " drafts of each prompt (set arte.n >= 2).")
  chosen, rejected, kept, skipped = [], [], [], []
  for g, idx in members.items():
    s = scores[idx]
    best, worst = idx[int(np.argmax(s))], idx[int(np.argmin(s))]
    if s.max() - s.min() <= min_gap:
      skipped.append(g)
      continue
    chosen.append(best)
    rejected.append(worst)
    kept.append(g)
  return DraftPairs(np.asarray(chosen, np.int64), np.asarray(rejected, np.int64), kept, skipped)
