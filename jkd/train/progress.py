"""The host side of each training step: metrics fetched one step late, the non-finite streak,
``perf/*`` throughput and MFU, the metrics file and the progress bar."""

from __future__ import annotations

import time

import jax

from jkd.train.writer import MetricsWriter


class StepMonitor:
  """Host side of each step: fetches its metrics one step late (so the device keeps working),
  counts non-finite steps, writes metrics and moves the progress bar."""

  def __init__(self, cfg, writer: MetricsWriter, bar, *, streak: int, peak_flops: float):
    self.writer, self.bar = writer, bar
    self.log_every, self.total = int(cfg.train.log_every), int(cfg.train.steps)
    self.max_nan = int(cfg.train.max_nan_steps)
    self.streak, self.peak = streak, peak_flops
    self.tokens, self.flops = 0, 0.0
    self.pending: tuple[int, dict] | None = None
    self._last_time: float | None = None
    self.first_bad: int | None = None
    self.overflowed = 0  # Bits of `train/nonfinite` seen in the streak: 1 loss, 2 grad, 4 update.

  def set_work(self, tokens: int, flops: float) -> None:
    """Tokens and model FLOPs of one step (for ``perf/tokens_per_s`` and ``perf/mfu``)."""
    self.tokens, self.flops = tokens, flops

  def restart_clock(self) -> None:
    """Leaves the time of an evaluation or a checkpoint out of the next step's perf metrics."""
    self._last_time = time.perf_counter()

  def push(self, step: int, metrics: dict) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    if self._last_time is not None:  # The first step of a process includes compilation.
      dt = now - self._last_time
      host.update({"perf/step_time_s": dt, "perf/tokens_per_s": self.tokens / dt,
                   "perf/mfu": self.flops / dt / self.peak if self.peak > 0 else 0.0})
    self._last_time = now
    finite = host.get("train/finite", 1.0) == 1.0
    self.streak = 0 if finite else self.streak + 1
    if finite:
      self.first_bad, self.overflowed = None, 0
    else:
      self.overflowed |= int(host.get("train/nonfinite", 0.0))
      if self.first_bad is None:
        self.first_bad = step
    if step % self.log_every == 0 or step == self.total or not finite:
      self.writer.write(step, host)
    self.bar.update(1)
    postfix = {"loss": f"{host['loss/total']:.4g}"}
    if "perf/tokens_per_s" in host:
      postfix["tok/s"] = f"{host['perf/tokens_per_s']:.3g}"
    self.bar.set_postfix(postfix, refresh=False)

  def too_many_nans(self) -> bool:
    return self.streak >= self.max_nan

  def what_overflowed(self) -> str:
    """What was non-finite in the streak: the loss, the gradient norm or the update."""
    bits = self.overflowed
    if bits & 1:
      return "the loss was NaN/inf"
    if bits & 2:
      return "the loss was finite, the gradient norm NaN/inf"
    if bits & 4:
      return ("the loss and gradient norm were finite, the optimizer's update NaN/inf (check"
              " optimizer.lr, eps and the schedule)")
    return "NaN/inf loss, gradient or update"
