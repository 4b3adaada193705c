"""Metrics of a run: ``metrics.jsonl`` (exact floats) and TensorBoard events, on process 0.

Each line of ``metrics.jsonl`` is ``{"step": s, "<namespace>/<name>": value, ...}`` with floats
written by ``repr`` (``json`` does), so they read back bit-for-bit. A resumed run first drops the
lines after its restored step, so the file always describes one consistent run; TensorBoard gets
``purge_step`` for the same effect. In a ``gs://`` workdir the file is rewritten whole at each
write (object stores cannot append) and TensorBoard events are not written.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Mapping

from jkd.train import storage

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: str) -> list[dict]:
  """The lines of ``workdir/metrics.jsonl`` as dicts (``[]`` when there is none)."""
  text = storage.read_text(storage.join(workdir, METRICS_FILE))
  return [] if text is None else [json.loads(line) for line in text.splitlines() if line.strip()]


def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without PyTorch.

  tensorboardX imports torch, when installed, only to accept torch tensors (1-2 s); jkd writes
  Python floats, so the import is hidden from it unless torch is already loaded.
  """
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` now raises ImportError, which it catches.
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard (a no-op when ``enabled`` is False).

  Args:
    workdir: the run's directory.
    start_step: the restored checkpoint's step: lines of later steps, left by an interrupted
      run, are dropped; -1 for a fresh run (every line of an earlier attempt that saved no
      checkpoint is dropped, its step-0 evaluation included).
    enabled: write at all (True on process 0 only).
    tensorboard: also write TensorBoard event files to ``workdir/tensorboard``.
  """

  def __init__(self, workdir: str, *, start_step: int = 0, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = storage.join(workdir, METRICS_FILE)
    self._tb = None
    self._file = None
    if not enabled:
      return
    storage.makedirs(workdir)
    kept = [json.dumps(m) + "\n" for m in read_metrics(workdir)
            if m.get("step", 0) <= start_step]
    storage.write_text(self.path, "".join(kept))
    self._remote = storage.is_remote(self.path)
    self._lines = kept  # What a remote file holds (it is written whole each time).
    if not self._remote:
      self._file = open(self.path, "a")  # noqa: SIM115  (closed in close())
    if tensorboard and not self._remote:
      self._tb = _summary_writer_class()(storage.join(workdir, "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
    if self._remote:
      self._lines.append(line)
      storage.write_text(self.path, "".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for name, value in metrics.items():
        if math.isfinite(value):
          self._tb.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
