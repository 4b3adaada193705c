"""Choosing what the student trains on: MiniPLM difference sampling and DDK domain weights.

- MiniPLM (Gu et al., 2024): score every document by how much more likely the teacher finds it
  than a small reference model, ``avg log p_teacher - avg log p_ref``, and keep the top fraction
  (0.5): documents that are easy for any small model, or noise the teacher does not like either,
  are dropped (:func:`miniplm_select`).
- DDK (Liu et al., 2024): sample training domains in proportion to the smoothed gap between the
  student's and the teacher's validation loss in each domain (:class:`DomainWeights`), through
  a resumable mixture of per-domain batch sources (:class:`DomainMixture`).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jkd import models
from jkd.data.pipeline import process_share
from jkd.losses import IGNORE_INDEX

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Document log-probabilities (any jkd model).

@functools.partial(jax.jit, static_argnames=("config",))
def _logprob_sums(params, tokens, labels, mask, *, config):
  logits = models.apply(params, tokens, config=config).logits
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  safe = jnp.where(mask, labels, 0)
  token_lp = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, token_lp, 0.0), axis=-1), jnp.sum(mask, axis=-1)


def _check_examples(examples: Mapping[str, Any], vocab: int) -> tuple[np.ndarray, ...]:
  if "tokens" not in examples or "labels" not in examples:
    raise ValueError(f"examples need 'tokens' and 'labels' ([N, T] arrays; 'loss_mask'"
                     f" optional); got {sorted(examples)}.")
  tokens, labels = np.asarray(examples["tokens"]), np.asarray(examples["labels"])
  mask = np.asarray(examples.get("loss_mask", np.ones(labels.shape, bool)))
  if tokens.ndim != 2 or labels.shape != tokens.shape or mask.shape != tokens.shape:
    raise ValueError(f"tokens, labels and loss_mask must be [N, T] arrays of one shape (pad the"
                     f" documents to one T); got {tokens.shape}, {labels.shape}, {mask.shape}.")
  if not (np.issubdtype(tokens.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
    raise ValueError(f"tokens and labels must be integer ids (got {tokens.dtype},"
                     f" {labels.dtype}).")
  if len(tokens) == 0:
    raise ValueError("no documents to score (N = 0).")
  mask = mask.astype(bool) & (labels != IGNORE_INDEX)
  for name, ids in (("tokens", tokens), ("labels", labels[mask])):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
      raise ValueError(f"{name} hold ids outside the model's vocabulary [0, {vocab}) (min"
                       f" {ids.min()}, max {ids.max()}): tokenize with the model's tokenizer.")
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"document(s) {empty[:5].tolist()} have no counted token (loss_mask False"
                     " or labels -100 everywhere): their average log-prob is undefined; drop"
                     " them before scoring.")
  return tokens.astype(np.int32), np.where(mask, labels, 0).astype(np.int32), mask


def _sums_and_counts(params, config, examples, batch_size) -> tuple[np.ndarray, np.ndarray]:
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int (got {batch_size!r}).")
  tokens, labels, mask = _check_examples(examples, config.vocab_size)
  n = len(tokens)
  padded = -(-n // batch_size) * batch_size  # one compiled shape: pad with masked-out rows
  pad = lambda x: np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])  # noqa
  tokens, labels, mask = pad(tokens), pad(labels), pad(mask)
  sums, counts = [], []
  for i in range(0, padded, batch_size):
    s, c = _logprob_sums(params, tokens[i:i + batch_size], labels[i:i + batch_size],
                         mask[i:i + batch_size], config=config)
    sums.append(np.asarray(s, np.float64))
    counts.append(np.asarray(c, np.int64))
  return np.concatenate(sums)[:n], np.concatenate(counts)[:n]


def document_logprob_means(params: PyTree, config: models.ModelConfig,
                           examples: Mapping[str, Any], *, batch_size: int = 8) -> np.ndarray:
  """Average log-probability of each document's counted tokens under a model.

  .. math:: \\frac{1}{|M_n|} \\sum_{t \\in M_n} \\log p(y_{n,t} \\mid x_{n,<t})

  with ``M_n`` the positions where ``loss_mask`` is True and ``labels != -100``. The forward
  pass is jitted once per batch shape (the last batch is padded).

  Args:
    params, config: any jkd model (teacher, reference or student).
    examples: ``{"tokens", "labels", "loss_mask"(optional)}``, ``[N, T]`` arrays (the documents
      padded to one ``T``).
    batch_size: documents per forward pass.

  Returns:
    ``[N]`` float64 average log-probabilities (<= 0).

  Raises:
    ValueError: missing or mis-shaped arrays, ids outside the vocabulary, or a document with
      no counted token.
  """
  sums, counts = _sums_and_counts(params, config, examples, batch_size)
  return sums / counts


def mean_token_nll(params: PyTree, config: models.ModelConfig, examples: Mapping[str, Any], *,
                   batch_size: int = 8) -> float:
  """Token-weighted mean negative log-likelihood over all documents (a validation loss).

  Feed it each domain's validation set, for the student and the teacher, to get the losses
  :meth:`DomainWeights.update` takes.
  """
  sums, counts = _sums_and_counts(params, config, examples, batch_size)
  return float(-sums.sum() / counts.sum())


# ---------------------------------------------------------------------------------------------
# MiniPLM difference sampling.

def difference_scores(teacher_logprob_means: Any, reference_logprob_means: Any) -> np.ndarray:
  """MiniPLM's score of each document: ``avg log p_teacher - avg log p_reference``.

  >>> difference_scores([-1.0, -3.0], [-2.0, -2.5]).tolist()
  [1.0, -0.5]
  """
  t = np.asarray(teacher_logprob_means, np.float64)
  r = np.asarray(reference_logprob_means, np.float64)
  if t.ndim != 1 or t.shape != r.shape:
    raise ValueError(f"teacher and reference log-prob means must be [N] arrays of one length;"
                     f" got shapes {t.shape} and {r.shape}.")
  bad = np.flatnonzero(~np.isfinite(t) | ~np.isfinite(r))
  if bad.size:
    raise ValueError(f"non-finite log-prob means for document(s) {bad[:5].tolist()}.")
  return t - r


def select_top_fraction(scores: Any, fraction: float = 0.5) -> np.ndarray:
  """Indices of the ``ceil(fraction * N)`` highest scores, in increasing index order.

  Ties are broken by position (the earlier document wins), so the choice is deterministic.

  >>> select_top_fraction([0.1, 0.5, 0.5, -1.0, 0.3], 0.5).tolist()
  [1, 2, 4]
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"scores must be a non-empty [N] array (got shape {s.shape}).")
  if np.isnan(s).any():
    raise ValueError(f"scores hold NaN at {np.flatnonzero(np.isnan(s))[:5].tolist()}.")
  if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1] (got {fraction!r}); MiniPLM keeps 0.5.")
  keep = max(1, math.ceil(fraction * s.size - 1e-9))
  order = np.argsort(-s, kind="stable")
  return np.sort(order[:keep])


class MiniPLMSelection(NamedTuple):
  """What :func:`miniplm_select` kept: the examples, their indices, and every score."""
  examples: dict[str, np.ndarray]
  indices: np.ndarray
  scores: np.ndarray


def miniplm_select(examples: Mapping[str, Any], *, teacher: tuple[PyTree, models.ModelConfig],
                   reference: tuple[PyTree, models.ModelConfig], fraction: float = 0.5,
                   batch_size: int = 8) -> MiniPLMSelection:
  """MiniPLM difference sampling: keep the documents the teacher prefers over a small model.

  Args:
    examples: ``[N, T]`` arrays ``tokens``, ``labels``, ``loss_mask`` (and any others, which are
      selected along).
    teacher: ``(params, config)`` of the teacher.
    reference: ``(params, config)`` of the small reference model (same tokenizer).
    fraction: share of the documents kept (MiniPLM: 0.5).
    batch_size: documents per forward pass.

  Returns:
    :class:`MiniPLMSelection`: the kept examples (in their original order), their indices, and
    the ``[N]`` scores.

  References: Gu et al., *MiniPLM: Knowledge Distillation for Pre-Training Language Models*,
  2024.
  """
  t = document_logprob_means(*teacher, examples, batch_size=batch_size)
  r = document_logprob_means(*reference, examples, batch_size=batch_size)
  scores = difference_scores(t, r)
  indices = select_top_fraction(scores, fraction)
  kept = {k: np.asarray(v)[indices] for k, v in examples.items()}
  return MiniPLMSelection(kept, indices, scores)


# ---------------------------------------------------------------------------------------------
# DDK domain weights.

class DomainWeights:
  """DDK's domain sampling weights from the student-teacher validation-loss gap per domain.

  At each :meth:`update`, with ``l_S[d]``, ``l_T[d]`` the student's and the teacher's validation
  losses in domain ``d`` of ``N``:

  .. math::
     g_d = \\max(l_S[d] - l_T[d], 0), \\quad
     s_d \\leftarrow \\alpha s_d + (1 - \\alpha) g_d \\ (s_d = g_d \\text{ at the first update}),
     \\quad w_d = (1 - f) \\frac{s_d}{\\sum_e s_e} + \\frac{f}{N}

  so domains where the student lags most are sampled most, the weights move smoothly, and the
  floor ``f`` keeps every domain at least ``f / N`` (uniform weights while every gap is 0).

  Args:
    domains: the domain names.
    alpha: smoothing factor of the moving average, in ``[0, 1)`` (0: no smoothing).
    floor: share of the weight spread uniformly, in ``(0, 1]``.
    initial: weights before the first update (default uniform), ``{domain: weight}``.

  References: Liu et al., *DDK: Distilling Domain Knowledge for Efficient Large Language
  Models*, NeurIPS 2024.

  >>> w = DomainWeights(["code", "web"], alpha=0.5, floor=0.1)
  >>> {d: round(v, 3) for d, v in w.update({"code": 3.0, "web": 2.0},
  ...                                       {"code": 2.0, "web": 2.0}).items()}
  {'code': 0.95, 'web': 0.05}
  """

  def __init__(self, domains: Sequence[str], *, alpha: float = 0.5, floor: float = 0.1,
               initial: Mapping[str, float] | None = None):
    domains = list(domains)
    if not domains or len(set(domains)) != len(domains) or not all(
        isinstance(d, str) for d in domains):
      raise ValueError(f"domains must be distinct strings, at least one (got {domains!r}).")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
      raise ValueError(f"alpha must be in [0, 1) (got {alpha!r}).")
    if not isinstance(floor, (int, float)) or not 0 < floor <= 1:
      raise ValueError(f"floor must be in (0, 1] (got {floor!r}) so that no domain gets zero"
                       " weight.")
    self.domains, self.alpha, self.floor = domains, float(alpha), float(floor)
    self.smoothed: np.ndarray | None = None
    self.updates = 0
    if initial is None:
      self.weights = np.full(len(domains), 1.0 / len(domains))
    else:
      w = self._vector(initial, "initial")
      if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"initial weights must be >= 0 with a positive sum (got {initial}).")
      self.weights = w / w.sum()

  def _vector(self, values: Mapping[str, float], name: str) -> np.ndarray:
    if not isinstance(values, Mapping):
      raise ValueError(f"{name} must be a {{domain: value}} dict over {self.domains}.")
    unknown = sorted(set(values) - set(self.domains))
    missing = [d for d in self.domains if d not in values]
    if unknown or missing:
      raise ValueError(f"{name}: unknown domain(s) {unknown}, missing domain(s) {missing};"
                       f" the domains are {self.domains}.")
    v = np.array([float(values[d]) for d in self.domains], np.float64)
    bad = [d for d, x in zip(self.domains, v) if not np.isfinite(x)]
    if bad:
      raise ValueError(f"{name}: non-finite value for domain(s) {bad}: {dict(values)}.")
    return v

  def as_dict(self) -> dict[str, float]:
    """The current weights, ``{domain: weight}`` (summing to 1)."""
    return {d: float(w) for d, w in zip(self.domains, self.weights)}

  def update(self, student_val_loss_per_domain: Mapping[str, float],
             teacher_val_loss_per_domain: Mapping[str, float]) -> dict[str, float]:
    """Folds in new validation losses (``{domain: loss}``, every domain) and returns the weights.

    Raises:
      ValueError: an unknown or missing domain, a NaN/inf or negative loss.
    """
    ls = self._vector(student_val_loss_per_domain, "student_val_loss_per_domain")
    lt = self._vector(teacher_val_loss_per_domain, "teacher_val_loss_per_domain")
    for name, v in (("student", ls), ("teacher", lt)):
      if (v < 0).any():
        raise ValueError(f"{name} validation losses must be >= 0 (negative log-likelihoods);"
                         f" got {dict(zip(self.domains, v.tolist()))}.")
    gap = np.maximum(ls - lt, 0.0)
    self.smoothed = (gap if self.smoothed is None
                     else self.alpha * self.smoothed + (1 - self.alpha) * gap)
    total = self.smoothed.sum()
    share = self.smoothed / total if total > 0 else np.full(len(gap), 1.0 / len(gap))
    self.weights = (1 - self.floor) * share + self.floor / len(gap)
    self.updates += 1
    return self.as_dict()

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state; :meth:`set_state` restores it exactly."""
    return {"domains": list(self.domains), "alpha": self.alpha, "floor": self.floor,
            "weights": self.weights.tolist(), "updates": self.updates,
            "smoothed": None if self.smoothed is None else self.smoothed.tolist()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores :meth:`get_state` of weights over the same domains."""
    if list(state["domains"]) != self.domains:
      raise ValueError(f"domain weights state is for domains {list(state['domains'])}, but"
                       f" these weights are over {self.domains}.")
    self.alpha, self.floor = float(state["alpha"]), float(state["floor"])
    self.weights = np.asarray(state["weights"], np.float64)
    self.updates = int(state["updates"])
    self.smoothed = None if state["smoothed"] is None else np.asarray(state["smoothed"],
                                                                       np.float64)


class DomainMixture:
  """A batch source drawing each example's domain from :class:`DomainWeights`.

  The domains of global batch ``step`` are drawn from ``numpy.random.default_rng([seed,
  step])`` with the current weights; this process takes its rows of that draw (the same split
  as :class:`jkd.data.ArraySource`) and fills them, in order, from each domain's
  sub-source (any object with ``__next__`` returning a per-process batch dict, ``get_state``,
  ``set_state``; e.g. one ``ArraySource`` per domain), buffering the unused rest of a
  sub-source's batch. :meth:`get_state` holds the step, the weights and, per domain, the
  sub-source state before its buffered batch plus the offset into it, so a restored mixture
  yields exactly the batches the interrupted one would have.

  Args:
    sources: ``{domain: batch source}``; every batch has the same keys and row shapes.
    weights: the :class:`DomainWeights` over the same domains (updated by the caller between
      batches, e.g. every ``K`` steps from :func:`mean_token_nll` per domain).
    batch_size: the global batch size (a multiple of ``process_count``).
    seed: seed of the domain draws.
    process_index, process_count: this process and the number of processes (default: JAX's).

  >>> from jkd.data import ArraySource
  >>> src = {d: ArraySource({"tokens": np.full((4, 2), i)}, 2, process_index=0,
  ...                       process_count=1) for i, d in enumerate(["a", "b"])}
  >>> mix = DomainMixture(src, DomainWeights(["a", "b"], initial={"a": 1.0, "b": 0.0}), 4,
  ...                     process_index=0, process_count=1)
  >>> next(mix)["tokens"][:, 0].tolist()
  [0, 0, 0, 0]
  """

  def __init__(self, sources: Mapping[str, Any], weights: DomainWeights, batch_size: int,
               seed: int = 0, *, process_index: int | None = None,
               process_count: int | None = None):
    if not isinstance(weights, DomainWeights):
      raise TypeError(f"weights must be a DomainWeights, got {type(weights).__name__}.")
    if sorted(sources) != sorted(weights.domains):
      raise ValueError(f"sources are for domains {sorted(sources)} but the weights for"
                       f" {sorted(weights.domains)}; give one source per weighted domain.")
    self.sources, self.weights = dict(sources), weights
    self.process_index, self.process_count = process_share(batch_size, process_index,
                                                           process_count)
    self.batch_size, self.seed = int(batch_size), int(seed)
    self.step = 0
    # Per domain: the sub-source state before the buffered batch, the batch, the offset.
    self._buffers: dict[str, tuple[Any, dict[str, np.ndarray], int] | None] = {
        d: None for d in self.weights.domains}

  @property
  def local_batch_size(self) -> int:
    return self.batch_size // self.process_count

  def draw_domains(self, step: int) -> np.ndarray:
    """Indices into ``weights.domains`` of the global batch ``step`` (all processes agree)."""
    rng = np.random.default_rng([self.seed, step])
    return rng.choice(len(self.weights.domains), size=self.batch_size, p=self.weights.weights)

  def _take(self, domain: str, n: int) -> list[dict[str, np.ndarray]]:
    parts, source = [], self.sources[domain]
    while n > 0:
      if self._buffers[domain] is None:
        before = copy.deepcopy(source.get_state())
        self._buffers[domain] = (before, {k: np.asarray(v) for k, v in next(source).items()}, 0)
      before, batch, offset = self._buffers[domain]
      size = len(next(iter(batch.values())))
      k = min(n, size - offset)
      parts.append({key: v[offset:offset + k] for key, v in batch.items()})
      offset += k
      n -= k
      self._buffers[domain] = None if offset == size else (before, batch, offset)
    return parts

  def __iter__(self) -> "DomainMixture":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    draw = self.draw_domains(self.step)
    lo = self.process_index * self.local_batch_size
    local = draw[lo:lo + self.local_batch_size]
    rows: list[dict[str, np.ndarray] | None] = [None] * len(local)
    for i, domain in enumerate(self.weights.domains):
      where = np.flatnonzero(local == i)
      if not where.size:
        continue
      chunk = self._take(domain, where.size)
      merged = {k: np.concatenate([c[k] for c in chunk]) for k in chunk[0]}
      for j, r in enumerate(where):
        rows[r] = {k: v[j] for k, v in merged.items()}
    keys = set(rows[0])
    for r in rows:
      if set(r) != keys:
        raise ValueError(f"domain sources give batches with different keys ({sorted(keys)} vs"
                         f" {sorted(r)}); give every domain the same arrays.")
    self.step += 1
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def one_epoch(self) -> Iterator[dict[str, np.ndarray]]:
    """Each domain's ``one_epoch()`` in turn (domain order), for evaluation."""
    for domain in self.weights.domains:
      yield from self.sources[domain].one_epoch()

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: step, weights, and each sub-source's state and offset."""
    subs = {}
    for d in self.weights.domains:
      buf = self._buffers[d]
      subs[d] = ({"state": copy.deepcopy(self.sources[d].get_state()), "offset": None}
                 if buf is None else {"state": copy.deepcopy(buf[0]), "offset": buf[2]})
    state = {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
             "weights": self.weights.get_state(), "sources": subs}
    json.dumps(state)  # fail here, not in the checkpointer, if a sub-source state is not JSON
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes at the position of :meth:`get_state` (same sources, batch size and seed)."""
    for key in ("seed", "batch_size"):
      if int(state[key]) != getattr(self, key):
        raise ValueError(f"mixture state has {key}={state[key]} but this mixture has"
                         f" {key}={getattr(self, key)}; resume with the same settings.")
    if sorted(state["sources"]) != sorted(self.sources):
      raise ValueError(f"mixture state has domains {sorted(state['sources'])}, this mixture"
                       f" {sorted(self.sources)}.")
    self.weights.set_state(state["weights"])
    for d, sub in state["sources"].items():
      self.sources[d].set_state(sub["state"])
      self._buffers[d] = None
      if sub["offset"] is not None:
        batch = {k: np.asarray(v) for k, v in next(self.sources[d]).items()}
        self._buffers[d] = (copy.deepcopy(sub["state"]), batch, int(sub["offset"]))
    self.step = int(state["step"])
