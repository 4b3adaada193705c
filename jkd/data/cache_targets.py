"""The released targets of a teacher cache, transformed once: FIRST-calibrated or Swing-private.

:func:`jkd.data.teacher_cache.write_teacher_cache` computes a cache's targets batch by batch with
a ``targets(inputs, index) -> (ids, logprobs, tail)`` function (``inputs``: the batch's model
inputs, ``index``: the batch's number). This module makes the two transformed ones and the
command-line flags and report lines that go with them:

* :func:`calibrated_targets` (FIRST, docs/methods.md §15): the teacher's top-k renormalised and
  tempered at a fitted temperature (:mod:`jkd.data.calibration`);
* :func:`private_targets` (Swing, docs/methods.md §16): the teacher's full distribution clipped
  and noised by the Gaussian mechanism, its noisy top-k released (:mod:`jkd.data.privacy`).

:func:`facts` and :func:`facts_lines` turn a cache's metadata into the numbers a training run
reports (``targets/*``, ``privacy/*``) and one printed line per transform.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jkd import models
from jkd.data import calibration
from jkd.data import privacy

PyTree = Any
Targets = Callable[[Mapping[str, Any], int], tuple]


@functools.partial(jax.jit, static_argnames=("floor",))
def _calibrated(lp, tail, temperature, *, floor: float):
  return (calibration.renormalize_topk(lp, temperature=temperature),
          jnp.full(tail.shape, floor, jnp.float32))


def calibrated_targets(targets: Targets, temperature: float, *, floor: float) -> Targets:
  """FIRST's targets from the plain ones: the top-k log-probabilities renormalised over the k
  ids at ``temperature`` (:func:`jkd.data.calibration.renormalize_topk`), the tail (mass
  outside the k) empty, stored as ``floor``."""
  def calibrated(inputs, index):
    ids, lp, tail = targets(inputs, index)
    return (ids, *_calibrated(lp, tail, jnp.float32(temperature), floor=floor))
  return calibrated


@functools.partial(jax.jit, static_argnames=("config", "k", "floor"))
def private_teacher_topk(params: PyTree, tokens: jax.Array, attention_mask, positions,
                         segment_ids, key: jax.Array, sigma, clip, *,
                         config: models.ModelConfig, k: int, floor: float):
  """Swing's released targets at every position of a ``[B, T]`` batch: the teacher's
  distribution clipped and noised, then its noisy top-k (:func:`jkd.data.privacy.private_topk`).

  Returns:
    ``(ids [B, T, k] int32, logprobs [B, T, k] float32, tail [B, T] float32)``.
  """
  logits = models.apply(params, tokens, config=config, attention_mask=attention_mask,
                        positions=positions, segment_ids=segment_ids).logits
  return privacy.private_topk(logits, key, sigma=sigma, clip=clip, k=k, floor=floor)


def private_targets(params: PyTree, config: models.ModelConfig, *, k: int, sigma: float,
                    clip: float, seed: int, floor: float) -> Targets:
  """Swing's targets: :func:`private_teacher_topk` with the key ``fold_in(key(seed), index)``
  for batch ``index`` (the seed must stay secret)."""
  base = jax.random.key(seed)

  def targets(inputs, index):
    return private_teacher_topk(params, inputs["tokens"], inputs.get("attention_mask"),
                                inputs.get("positions"), inputs.get("segment_ids"),
                                jax.random.fold_in(base, index), jnp.float32(sigma),
                                jnp.float32(clip), config=config, k=k, floor=floor)
  return targets


# -------------------------------------------------------------------------------------------------
# Command line


def add_flags(p: argparse.ArgumentParser) -> None:
  """The flags of ``python -m jkd.data.teacher_cache`` for a held-out eval split, FIRST's
  calibration and Swing's privacy."""
  p.add_argument("--eval_split", default=None,
                 help="also cache this split (of --eval_dataset) as the cache's 'eval' split")
  p.add_argument("--eval_dataset", default=None, help="default: --dataset")
  first = p.add_argument_group("FIRST: calibrated targets (docs/methods.md §15)")
  first.add_argument("--calibrate", action="store_true",
                     help="renormalise the top-k and temper it at a temperature fitted on"
                          " held-out data")
  first.add_argument("--calibration_dataset", default=None, help="default: --dataset")
  first.add_argument("--calibration_split", default=None,
                     help="held-out split to fit on (default: --eval_split, else 'eval')")
  first.add_argument("--calibration_criterion", default="ece", choices=calibration.CRITERIA)
  first.add_argument("--calibration_limit", type=int, default=None,
                     help="fit on the first N held-out examples only")
  swing = p.add_argument_group("Swing: private targets (docs/methods.md §16)")
  swing.add_argument("--privacy_epsilon", type=float, default=None,
                     help="release Gaussian-noised targets, (epsilon, delta)-DP per unit")
  swing.add_argument("--privacy_delta", type=float, default=1e-5)
  swing.add_argument("--privacy_clip", type=float, default=1.0,
                     help="L2 clip of each position's distribution")
  swing.add_argument("--privacy_mechanism", default="analytic", choices=privacy.MECHANISMS)
  swing.add_argument("--privacy_unit", default="sequence", choices=privacy.UNITS)
  swing.add_argument("--privacy_seed", type=int, default=None,
                     help="fixed noise seed (tests only: whoever knows it removes the noise)")


def flag_options(args: argparse.Namespace, load: Callable[[str, str, int | None], Any],
                 error: Callable[[str], Any]) -> dict[str, Any]:
  """``write_teacher_cache`` keyword options from the flags of :func:`add_flags`.

  Args:
    args: the parsed flags (with ``dataset`` and ``split``).
    load: ``(dataset, split, limit) -> examples``.
    error: reports a flag error (``parser.error``).
  """
  options: dict[str, Any] = {}
  if args.calibrate:
    dataset = args.calibration_dataset or args.dataset
    split = args.calibration_split or args.eval_split or "eval"
    same = dataset.rstrip("/") == args.dataset.rstrip("/")
    if same and (split == args.split or dataset.endswith(".npz")):
      error(f"--calibrate fits the temperature on held-out data, not on the cached"
            f" {args.dataset}:{args.split}; pass --calibration_split (e.g. eval) or"
            " --calibration_dataset.")
    if args.privacy_epsilon is not None:
      error("--calibrate (FIRST) and --privacy_epsilon (Swing) make two different caches;"
            " write one per method.")
    options.update(calibrate_on=load(dataset, split, args.calibration_limit),
                   calibration_criterion=args.calibration_criterion)
  if args.eval_split is not None:
    options["eval_examples"] = load(args.eval_dataset or args.dataset, args.eval_split, None)
  if args.privacy_epsilon is not None:
    options["privacy"] = privacy.PrivacySpec(
        epsilon=args.privacy_epsilon, delta=args.privacy_delta, clip=args.privacy_clip,
        mechanism=args.privacy_mechanism, unit=args.privacy_unit, seed=args.privacy_seed)
  return options


# -------------------------------------------------------------------------------------------------
# What a run reports


#: ``metadata["calibration"]`` / ``metadata["privacy"]`` keys -> the run's metric names.
CALIBRATION_FACTS = {"temperature": "targets/temperature", "teacher_ece": "targets/teacher_ece",
                     "renormalized_ece": "targets/renormalized_ece",
                     "calibrated_ece": "targets/calibrated_ece",
                     "coverage": "targets/topk_coverage"}
PRIVACY_FACTS = {"epsilon": "privacy/epsilon", "delta": "privacy/delta",
                 "sigma": "privacy/sigma", "clip": "privacy/clip",
                 "epsilon_position": "privacy/epsilon_position",
                 "epsilon_sequence": "privacy/epsilon_sequence"}


def facts(meta: Mapping[str, Any]) -> dict[str, float]:
  """The numbers a run on this cache reports: ``targets/*`` (FIRST) and ``privacy/*`` (Swing).

  >>> facts({"calibration": {"temperature": 1.5, "teacher_ece": 0.2, "renormalized_ece": 0.3,
  ...                        "calibrated_ece": 0.05, "coverage": 0.8}})["targets/temperature"]
  1.5
  >>> facts({"kind": "teacher_cache"})
  {}
  """
  out = {}
  for section, names in (("calibration", CALIBRATION_FACTS), ("privacy", PRIVACY_FACTS)):
    found = meta.get(section) or {}
    out.update({metric: float(found[key]) for key, metric in names.items() if key in found})
  return out


def facts_lines(meta: Mapping[str, Any]) -> list[str]:
  """One line each on a cache's FIRST calibration and Swing privacy (none for a plain cache).

  >>> facts_lines({"privacy": {"epsilon": 8.0, "delta": 1e-5, "unit": "sequence",
  ...     "sigma": 2.5, "clip": 1.0, "mechanism": "analytic", "epsilon_position": 0.5,
  ...     "epsilon_sequence": 8.0}})[0][:59]
  'Swing: (epsilon=8, delta=1e-05)-DP per sequence, sigma=2.5,'
  """
  lines = []
  c = meta.get("calibration")
  if c:
    lines.append(f"FIRST: temperature {c['temperature']:.4g} ({c['criterion']}) fitted on"
                 f" {c['positions']} held-out positions; teacher ECE {c['teacher_ece']:.4f},"
                 f" renormalised top-k {c['renormalized_ece']:.4f}, calibrated"
                 f" {c['calibrated_ece']:.4f}; labels in the top k: {c['coverage']:.1%}")
  q = meta.get("privacy")
  if q:
    lines.append(f"Swing: (epsilon={q['epsilon']:g}, delta={q['delta']:g})-DP per {q['unit']},"
                 f" sigma={q['sigma']:.4g}, clip={q['clip']:g} ({q['mechanism']} Gaussian"
                 f" mechanism); one position costs epsilon {q['epsilon_position']:.4g}, one"
                 f" sequence {q['epsilon_sequence']:.4g}")
  return lines
