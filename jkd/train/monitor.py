"""Teacher-hacking monitor: the proxy metric (student vs teacher) against a golden one.

"On Teacher Hacking" (Tiapkin et al. 2025): trained long enough on a fixed teacher-written set, a
student keeps getting closer to the teacher (the *proxy*, e.g. ``eval/kl_forward`` on held-out
teacher text) while it drifts from the truth (a *golden* metric, e.g. the student's NLL on
held-out real text). Two signals, computed from the run's evaluation history alone (so a resumed
run reaches the same verdict):

* the proxy leaves its power-law fit: ``log proxy = a + b log step`` is fitted on the first
  evaluations, and a later point whose log-residual exceeds ``tolerance`` for ``patience``
  evaluations in a row is flagged (the proxy curve bends away from the power law);
* proxy and golden diverge: over the last ``patience + 1`` evaluations the proxy improved while
  the golden metric got worse by more than ``tolerance`` (relative).

>>> steps = [10, 20, 40, 80, 160, 320]
>>> proxy = [2.0 * s ** -0.3 for s in steps]          # an exact power law: no flag
>>> golden = [3.0, 2.9, 2.85, 2.83, 2.82, 2.81]
>>> assess(steps, proxy, golden).flagged
False
>>> proxy[-2:] = [p * 0.6 for p in proxy[-2:]]        # the proxy plunges off the power law ...
>>> golden[-3:] = [2.83, 3.0, 3.3]                    # ... while the golden metric worsens
>>> verdict = assess(steps, proxy, golden); verdict.flagged, verdict.off_fit, verdict.diverging
(True, True, True)
"""

from __future__ import annotations

import math
import sys
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from jkd.train.writer import MetricsWriter, read_metrics

#: The default proxy and golden metrics (eval metrics of the engine).
PROXY_METRIC = "eval/kl_forward"
GOLDEN_METRIC = "golden/student_nll"


class Verdict(NamedTuple):
  """What :func:`assess` found.

  Attributes:
    flagged: ``off_fit or diverging``.
    off_fit: the proxy left its power-law fit (``patience`` evaluations in a row).
    diverging: the proxy improved while the golden metric worsened (last ``patience + 1``).
    fit: ``(a, b)`` of ``log proxy = a + b log step`` (None: too few points).
    residuals: log-residual of every point against the fit (``[]`` without a fit).
    first_step: the step where the flag first holds (None when not flagged).
  """
  flagged: bool
  off_fit: bool
  diverging: bool
  fit: tuple[float, float] | None
  residuals: list[float]
  first_step: int | None


def fit_power_law(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
  """Least-squares ``(a, b)`` of ``log value = a + b log step`` (steps and values > 0).

  >>> a, b = fit_power_law([1, 2, 4, 8], [3.0, 1.5, 0.75, 0.375])
  >>> round(math.exp(a), 6), round(b, 6)
  (3.0, -1.0)
  """
  s, v = np.asarray(steps, np.float64), np.asarray(values, np.float64)
  if s.shape != v.shape or s.size < 2:
    raise ValueError(f"a power-law fit needs >= 2 (step, value) pairs of equal length (got"
                     f" {s.size} steps, {v.size} values).")
  if (s <= 0).any() or (v <= 0).any() or not np.isfinite(v).all():
    raise ValueError("a power-law fit needs positive steps and positive finite values (a KL or"
                     " NLL proxy; evaluate from step >= 1).")
  b, a = np.polyfit(np.log(s), np.log(v), 1)
  return float(a), float(b)


def assess(steps: Sequence[int], proxy: Sequence[float],
           golden: Sequence[float] | None = None, *, fit_points: int = 4,
           tolerance: float = 0.1, patience: int = 2) -> Verdict:
  """Flags teacher hacking from an evaluation history (lower is better for both metrics).

  Args:
    steps: evaluation steps (increasing, >= 1).
    proxy: the proxy metric at those steps (e.g. student-teacher KL on teacher text).
    golden: the golden metric at those steps (e.g. student NLL on real text), or None.
    fit_points: evaluations the power law is fitted on (the first ones).
    tolerance: log-residual beyond which a point is off the fit; also the relative worsening of
      the golden metric that counts as divergence.
    patience: consecutive evaluations a signal must hold.

  Returns:
    A :class:`Verdict`.
  """
  steps = [int(s) for s in steps]
  proxy = [float(p) for p in proxy]
  if len(steps) != len(proxy) or (golden is not None and len(golden) != len(steps)):
    raise ValueError(f"steps ({len(steps)}), proxy ({len(proxy)}) and golden"
                     f" ({None if golden is None else len(golden)}) need one value per"
                     " evaluation.")
  if fit_points < 2 or patience < 1 or tolerance <= 0:
    raise ValueError(f"need fit_points >= 2, patience >= 1, tolerance > 0 (got {fit_points},"
                     f" {patience}, {tolerance}).")
  fit, residuals, off_at = None, [], None
  if len(steps) > fit_points:
    fit = fit_power_law(steps[:fit_points], proxy[:fit_points])
    a, b = fit
    residuals = [math.log(p) - (a + b * math.log(s)) if p > 0 else -math.inf
                 for s, p in zip(steps, proxy)]
    run = 0
    for i in range(fit_points, len(steps)):
      run = run + 1 if abs(residuals[i]) > tolerance else 0
      if run >= patience and off_at is None:
        off_at = steps[i]
  div_at = None
  if golden is not None:
    g = [float(x) for x in golden]
    for i in range(patience, len(steps)):
      j = i - patience
      if proxy[i] < proxy[j] and g[i] > g[j] * (1 + tolerance) and all(
          g[k + 1] >= g[k] for k in range(j, i)):
        div_at = steps[i]
        break
  firsts = [s for s in (off_at, div_at) if s is not None]
  return Verdict(flagged=bool(firsts), off_fit=off_at is not None,
                 diverging=div_at is not None, fit=fit, residuals=residuals,
                 first_step=min(firsts) if firsts else None)


def assess_history(history: Sequence[dict], *, proxy: str = PROXY_METRIC,
                   golden: str = GOLDEN_METRIC, **options) -> Verdict | None:
  """:func:`assess` over ``metrics.jsonl`` lines (:func:`jkd.train.read_metrics`): the
  evaluations at steps >= 1 that have ``proxy`` (and ``golden`` when every one has it).

  Returns None when the run has no ``proxy`` evaluations after step 0.
  """
  rows = [r for r in history if proxy in r and r["step"] >= 1]
  if not rows:
    return None
  with_golden = all(golden in r for r in rows)
  return assess([r["step"] for r in rows], [r[proxy] for r in rows],
                [r[golden] for r in rows] if with_golden else None, **options)


class HackingWatch:
  """After each evaluation: the teacher-hacking verdict (:func:`assess_history`) over the
  run's evaluations so far (read back from ``metrics.jsonl``, so a resumed run continues it),
  logged as ``monitor/flagged``, ``monitor/off_fit``, ``monitor/diverging`` (0/1), with a
  warning line when it first flags."""

  def __init__(self, workdir: str, writer: MetricsWriter, *, enabled: bool):
    self.enabled, self.writer = enabled, writer
    self.history = read_metrics(workdir) if enabled else []
    self.flagged = False

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self.history.append({"step": step, **metrics})
    verdict = assess_history(self.history)
    if verdict is None or verdict.fit is None:
      return
    self.writer.write(step, {"monitor/flagged": float(verdict.flagged),
                             "monitor/off_fit": float(verdict.off_fit),
                             "monitor/diverging": float(verdict.diverging)})
    if verdict.flagged and not self.flagged:
      signs = [text for on, text in ((verdict.off_fit, "left its power-law fit"),
                                     (verdict.diverging, "improves while the golden NLL worsens"))
               if on]
      print(f"step {step}: possible teacher hacking since step {verdict.first_step}: the"
            f" student-teacher KL {' and '.join(signs)} (jkd.train.monitor).", file=sys.stderr,
            flush=True)
    self.flagged = verdict.flagged
