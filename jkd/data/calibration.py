"""Calibrated teacher targets (FIRST): the teacher's top-k, renormalised and temperature-scaled.

FIRST (Shum et al., EMNLP 2024, arXiv:2408.12168; docs/methods.md §15) keeps only the teacher's
few most likely next tokens ("concentrated knowledge", top-5 in the paper), renormalises their
probabilities to sum to one, and re-tempers them with one temperature chosen on held-out data so
that the targets the student learns from are calibrated ("trustworthy maximization"). With the
top-k log-probabilities ``a_1..a_k`` of a position (at temperature 1, as a teacher cache stores
them) the released target is

.. math::

   \\tilde p_T(i) = \\frac{\\exp(a_i / T)}{\\sum_{j \\le k} \\exp(a_j / T)},\\qquad i = 1..k,

nothing outside the top k. :func:`renormalize_topk` computes it; :func:`fit_temperature` picks
``T`` on held-out positions with labels, by the expected calibration error of the released
targets (``criterion="ece"``, a grid search: FIRST's aim) or by the negative log-likelihood of
the labels (``criterion="nll"``, the classic temperature scaling of Guo et al. 2017, exact by
bisection). :func:`topk_ece` and :func:`topk_nll` are the two criteria; the ECE uses the bins of
:mod:`jkd.train.evaluate` (15 equal-width confidence bins), so the teacher's numbers here compare
with the student's ``eval/student_ece``.

All functions compute in float32 and are pure; :func:`fit_temperature` returns Python floats.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: Confidence bins of the ECE (the same as ``jkd.train.evaluate.ECE_BINS``).
ECE_BINS = 15
#: ``fit_temperature`` criteria.
CRITERIA = ("ece", "nll")
IGNORE_INDEX = -100


def _check_temperature(temperature) -> None:
  if isinstance(temperature, (int, float)) and not (math.isfinite(temperature)
                                                      and temperature > 0):
    raise ValueError(f"temperature must be a finite number > 0 (got {temperature!r}).")


def _check_topk(logprobs, ids=None, labels=None) -> None:
  """Shapes: ``logprobs [..., k]`` with ``k >= 1``, ``ids`` like it, ``labels`` its ``[...]``."""
  shape = np.shape(logprobs)
  if len(shape) < 1 or shape[-1] < 1:
    raise ValueError(f"the top-k log-probabilities need a last axis of k >= 1 ids; got shape"
                     f" {list(shape)} (k < 1 keeps no token: cache at least one).")
  if ids is not None and np.shape(ids) != shape:
    raise ValueError(f"ids have shape {list(np.shape(ids))} but the log-probabilities have"
                     f" {list(shape)}; pass the cache's teacher_topk_ids with its"
                     " teacher_topk_logprobs.")
  if labels is not None and tuple(np.shape(labels)) != tuple(shape[:-1]):
    raise ValueError(f"labels have shape {list(np.shape(labels))}, expected"
                     f" {list(shape[:-1])} (the log-probabilities' shape without k).")


def renormalize_topk(logprobs: Array, *, temperature: float | Array = 1.0) -> Array:
  """The FIRST target: the top-k log-probabilities renormalised over the k ids at temperature T.

  ``log p_T(i) = a_i / T - logsumexp_j(a_j / T)``: the mass outside the top k is dropped and the
  k probabilities re-tempered (at ``T = 1`` only renormalised). ``-inf`` entries (tokens the
  teacher bans) stay ``-inf``.

  Args:
    logprobs: ``[..., k]`` teacher log-probabilities of its top-k ids (temperature 1; any float
      dtype, computed in float32).
    temperature: ``T > 0`` (a Python number or a scalar array).

  Returns:
    ``[..., k]`` float32 log-probabilities that sum to one over the k ids.

  >>> lp = jnp.log(jnp.array([0.4, 0.3, 0.1]))
  >>> [round(float(x), 4) for x in jnp.exp(renormalize_topk(lp))]
  [0.5, 0.375, 0.125]
  """
  _check_topk(logprobs)
  _check_temperature(temperature)
  a = jnp.asarray(logprobs, jnp.float32)
  return jax.nn.log_softmax(a / jnp.asarray(temperature, jnp.float32), axis=-1)


def _mask(labels: Array, where: Array | None) -> Array:
  mask = jnp.asarray(labels) != IGNORE_INDEX
  return mask if where is None else mask & jnp.asarray(where, bool)


def topk_nll(logprobs: Array, ids: Array, labels: Array, *,
             temperature: float | Array = 1.0) -> Array:
  """Per-position ``-log p_T(y)`` of the label under :func:`renormalize_topk`.

  ``+inf`` where the label is not among the k ids (the released target gives it no mass, at
  every temperature) or where its log-probability is ``-inf``.

  Args:
    logprobs: ``[..., k]`` top-k log-probabilities (temperature 1).
    ids: ``[..., k]`` their token ids.
    labels: ``[...]`` next-token ids (``-100`` where none; those positions get ``+inf`` too:
      mask them).
    temperature: ``T > 0``.

  Returns:
    ``[...]`` float32.

  >>> lp = jnp.log(jnp.array([[0.4, 0.3, 0.1]])); ids = jnp.array([[7, 2, 5]])
  >>> [round(float(x), 4) for x in topk_nll(lp, ids, jnp.array([2]))], float(topk_nll(lp, ids,
  ...                                                                       jnp.array([9]))[0])
  ([0.9808], inf)
  """
  _check_topk(logprobs, ids, labels)
  logp = renormalize_topk(logprobs, temperature=temperature)
  hit = jnp.asarray(ids) == jnp.asarray(labels)[..., None]
  picked = jnp.max(jnp.where(hit, logp, -jnp.inf), axis=-1)
  return -picked


def expected_calibration_error(confidence: Array, correct: Array, where: Array, *,
                               num_bins: int = ECE_BINS) -> Array:
  """``sum_b |sum_{i in b} (correct_i - conf_i)| / N`` over the counted positions.

  Bin ``b`` holds confidences in ``(b/B, (b+1)/B]`` (as :mod:`jkd.train.evaluate`).

  Args:
    confidence: ``[...]`` probability of the predicted token, in ``(0, 1]``.
    correct: ``[...]`` bool, the prediction equals the label.
    where: ``[...]`` bool, positions that count (at least one).
    num_bins: ``B``.

  Returns:
    A float32 scalar (0 when no position counts).

  >>> round(float(expected_calibration_error(jnp.array([0.9, 0.9]), jnp.array([True, False]),
  ...                                        jnp.array([True, True]))), 4)
  0.4
  """
  conf = jnp.asarray(confidence, jnp.float32)
  where = jnp.asarray(where, bool)
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  onehot = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * where[..., None]
  gap = jnp.einsum("...b,...->b", onehot,
                   jnp.asarray(correct, jnp.float32) - jnp.where(where, conf, 0.0))
  return jnp.sum(jnp.abs(gap)) / jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)


def topk_ece(logprobs: Array, ids: Array, labels: Array, *, where: Array | None = None,
             temperature: float | Array = 1.0, renormalize: bool = True,
             num_bins: int = ECE_BINS) -> Array:
  """ECE of the teacher's top-1 prediction with top-k targets, over held-out positions.

  The prediction is the most likely of the k ids; it is correct when it equals the label (a
  label outside the top k is never predicted). Its confidence is its probability under
  :func:`renormalize_topk` at ``temperature`` (``renormalize=True``: the released FIRST target)
  or the teacher's own full-vocabulary probability ``exp(max a_i)`` (``renormalize=False``,
  ``temperature`` must be 1: the teacher's ECE as ``eval/teacher_ece`` measures it).

  Args:
    logprobs, ids: ``[..., k]`` the teacher's top-k (temperature 1) and their ids.
    labels: ``[...]`` next-token ids, ``-100`` where none.
    where: optional ``[...]`` bool, positions that count (ANDed with ``labels != -100``).
    temperature: ``T > 0``.
    renormalize: see above.
    num_bins: confidence bins.

  Returns:
    A float32 scalar.

  >>> lp = jnp.log(jnp.array([[0.6, 0.2], [0.6, 0.2]])); ids = jnp.array([[1, 2], [1, 2]])
  >>> round(float(topk_ece(lp, ids, jnp.array([1, 3]))), 4)  # confidence 0.75, accuracy 0.5
  0.25
  """
  _check_topk(logprobs, ids, labels)
  if not renormalize and not (isinstance(temperature, (int, float)) and temperature == 1):
    raise ValueError("topk_ece(renormalize=False) is the teacher's own ECE at temperature 1;"
                     f" got temperature={temperature!r} (renormalize to temper).")
  logp = (renormalize_topk(logprobs, temperature=temperature) if renormalize
          else jnp.asarray(logprobs, jnp.float32))
  best = jnp.argmax(logp, axis=-1)
  conf = jnp.exp(jnp.take_along_axis(logp, best[..., None], axis=-1)[..., 0])
  pred = jnp.take_along_axis(jnp.asarray(ids), best[..., None], axis=-1)[..., 0]
  labels = jnp.asarray(labels)
  mask = _mask(labels, where)
  return expected_calibration_error(conf, (pred == labels) & mask, mask, num_bins=num_bins)


class TemperatureFit(NamedTuple):
  """What :func:`fit_temperature` found (Python numbers; ``as_metadata()`` for a cache).

  Attributes:
    temperature: the fitted ``T``.
    criterion: ``"ece"`` or ``"nll"``.
    positions: held-out positions counted.
    coverage: fraction of them whose label is among the top k.
    teacher_ece: the teacher's own ECE (full-vocabulary confidence, temperature 1).
    renormalized_ece: ECE of the top-k renormalised at ``T = 1``.
    calibrated_ece: ECE of the released targets (renormalised at the fitted ``T``).
    renormalized_nll, calibrated_nll: mean ``-log p_T(y)`` over the covered positions at
      ``T = 1`` and at the fitted ``T`` (NaN when no label is covered).
  """
  temperature: float
  criterion: str
  positions: int
  coverage: float
  teacher_ece: float
  renormalized_ece: float
  calibrated_ece: float
  renormalized_nll: float
  calibrated_nll: float

  def as_metadata(self) -> dict[str, Any]:
    return {"method": "FIRST", **self._asdict()}


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _stats(a, ids, labels, covered, temperature, *, num_bins: int):
  """ECE of the renormalised targets at ``temperature`` and their mean NLL over ``covered``."""
  ece = topk_ece(a, ids, labels, temperature=temperature, num_bins=num_bins)
  nll = topk_nll(a, ids, labels, temperature=temperature)
  total = jnp.sum(jnp.where(covered, nll, 0.0))
  return ece, total / jnp.maximum(jnp.sum(covered), 1).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _ece_grid(a, ids, labels, grid, *, num_bins: int):
  return jax.lax.map(lambda t: topk_ece(a, ids, labels, temperature=t, num_bins=num_bins), grid)


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _teacher_ece(lp, ids, labels, *, num_bins: int):
  return topk_ece(lp, ids, labels, renormalize=False, num_bins=num_bins)


@jax.jit
def _nll_root(a: Array, picked: Array, lo: Array, hi: Array) -> Array:
  """The ``beta = 1/T`` in ``[lo, hi]`` where the NLL's derivative in ``beta`` changes sign.

  ``NLL(beta) = sum_i [logsumexp_j(beta a_ij) - beta a_iy]`` is convex in ``beta``; its
  derivative ``sum_i [E_{p_beta}[a_i] - a_iy]`` increases, so bisection finds the minimiser
  (an end of the interval when the sign does not change).
  """
  def slope(beta):
    p = jax.nn.softmax(beta * a, axis=-1)
    mean = jnp.sum(jnp.where(p > 0, p * a, 0.0), axis=-1)
    return jnp.sum(mean - picked)

  def body(_, bounds):
    low, high = bounds
    mid = 0.5 * (low + high)
    up = slope(mid) > 0
    return jnp.where(up, low, mid), jnp.where(up, mid, high)

  low, high = jax.lax.fori_loop(0, 64, body, (lo, hi))
  beta = 0.5 * (low + high)
  beta = jnp.where(slope(lo) >= 0, lo, beta)
  return jnp.where(slope(hi) <= 0, hi, beta)


def fit_temperature(logprobs, ids, labels, *, where=None, criterion: str = "ece",
                    min_temperature: float = 0.05, max_temperature: float = 20.0,
                    grid_size: int = 241, num_bins: int = ECE_BINS) -> TemperatureFit:
  """The temperature of FIRST's "trustworthy maximization", fitted on held-out positions.

  * ``criterion="ece"`` (default): the ``T`` of a log-spaced grid of ``grid_size`` temperatures
    in ``[min_temperature, max_temperature]`` with the smallest :func:`topk_ece` of the
    renormalised targets (the first on ties). ECE is piecewise constant in ``T``, hence a grid.
  * ``criterion="nll"``: the ``T`` in that interval minimising the mean :func:`topk_nll` over
    the positions whose label is among the top k (the others have probability 0 at every ``T``
    and cannot inform it): convex in ``1/T``, found by bisection on its derivative.

  Args:
    logprobs: ``[..., k]`` the teacher's top-k log-probabilities at temperature 1 on held-out
      data (e.g. :func:`jkd.data.teacher_cache.topk_logprobs`).
    ids: ``[..., k]`` their ids.
    labels: ``[...]`` the true next tokens (``-100`` where none).
    where: optional ``[...]`` bool, positions that count.
    criterion: ``"ece"`` or ``"nll"``.
    min_temperature, max_temperature: the search interval (``0 < min < max``).
    grid_size: temperatures tried by ``"ece"`` (>= 2).
    num_bins: ECE bins.

  Returns:
    A :class:`TemperatureFit`.

  Raises:
    ValueError: bad options or shapes, no counted position, or (``"nll"``) no label among the
      top k.

  >>> lp = jnp.log(jnp.array([[0.9, 0.1]] * 4)); ids = jnp.array([[0, 1]] * 4)
  >>> fit = fit_temperature(lp, ids, jnp.array([0, 0, 0, 1]), criterion="nll")
  >>> round(fit.temperature, 3), round(fit.calibrated_nll, 4)  # 0.9 right 3 times in 4: 0.75
  (2.0, 0.5623)
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {list(CRITERIA)} (got {criterion!r}).")
  if not (math.isfinite(min_temperature) and math.isfinite(max_temperature)
          and 0 < min_temperature < max_temperature):
    raise ValueError(f"the temperature interval needs 0 < min_temperature < max_temperature"
                     f" (got {min_temperature}, {max_temperature}).")
  if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 2:
    raise ValueError(f"grid_size must be an int >= 2 (got {grid_size!r}).")
  _check_topk(logprobs, ids, labels)
  a = jnp.asarray(logprobs, jnp.float32).reshape(-1, np.shape(logprobs)[-1])
  ids = jnp.asarray(ids).reshape(a.shape)
  labels = jnp.asarray(labels).reshape(-1)
  mask = _mask(labels, None if where is None else jnp.asarray(where).reshape(-1))
  positions = int(jnp.sum(mask))
  if positions == 0:
    raise ValueError("the held-out data has no counted position (every label is -100 or"
                     " masked): pass held-out examples with labels to fit the temperature on.")
  raw = a[mask]
  ids, labels = ids[mask], labels[mask]
  # Shifted per row (the targets do not change): sums over many positions stay accurate.
  a = raw - jnp.max(raw, axis=-1, keepdims=True)
  picked = jnp.max(jnp.where(ids == labels[:, None], a, -jnp.inf), axis=-1)
  covered = jnp.isfinite(picked)
  n_covered = int(jnp.sum(covered))
  if criterion == "nll":
    if n_covered == 0:
      raise ValueError("no held-out label is among the teacher's top-k ids, so the labels'"
                       " likelihood cannot pick a temperature: use criterion='ece', a larger k"
                       " or more held-out data.")
    beta = _nll_root(a[covered], picked[covered], jnp.float32(1.0 / max_temperature),
                     jnp.float32(1.0 / min_temperature))
    temperature = float(1.0 / beta)
  else:
    grid = np.geomspace(min_temperature, max_temperature, grid_size).astype(np.float32)
    values = _ece_grid(a, ids, labels, jnp.asarray(grid), num_bins=num_bins)
    temperature = float(grid[int(jnp.argmin(values))])
  before = _stats(a, ids, labels, covered, jnp.float32(1.0), num_bins=num_bins)
  after = _stats(a, ids, labels, covered, jnp.float32(temperature), num_bins=num_bins)
  nll = (lambda x: float(x) if n_covered else math.nan)  # noqa: E731
  return TemperatureFit(
      temperature=temperature, criterion=criterion, positions=positions,
      coverage=n_covered / positions,
      teacher_ece=float(_teacher_ece(raw, ids, labels, num_bins=num_bins)),
      renormalized_ece=float(before[0]), calibrated_ece=float(after[0]),
      renormalized_nll=nll(before[1]), calibrated_nll=nll(after[1]))
