"""Checkpoints of a run: the sharded train state, the data position and the resolved config.

Built on ``orbax.checkpoint.CheckpointManager``: asynchronous saves (the arrays are copied to
the host before :meth:`Checkpointer.save` returns, so the caller may donate them right after),
the newest ``keep`` checkpoints kept plus, optionally, the best by an eval metric. Orbax writes
each step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a process killed
mid-save leaves every earlier checkpoint valid (the temporary directory is never read).

Restoring checks the stored shapes against the model first (a checkpoint of another model is a
``ValueError`` naming the parameter and both shapes) and never writes to the directory; an
unreadable checkpoint is a :class:`CheckpointError` and is left as it is.
"""

from __future__ import annotations

import errno as errno_lib
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jkd import errors
from jkd.errors import CheckpointError, CheckpointMismatchError, SaveError
from jkd.train import storage

PyTree = Any

TMP_SUFFIX = ".orbax-checkpoint-tmp"

#: Room kept free beyond a checkpoint's array bytes (metadata, JSON items, file system slack).
_SPACE_MARGIN = 1 << 20


class _Skip(Exception):
  """No free-space check for this directory (object storage)."""


def _brief(e: BaseException, limit: int = 300) -> str:
  """``"TypeName: first line"`` of an exception (orbax's messages run to pages)."""
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def state_bytes(state: PyTree) -> int:
  """Bytes this process writes for ``state``: its shards with ``replica_id == 0``."""
  total = 0
  for leaf in jax.tree.leaves(state):
    shards = getattr(leaf, "addressable_shards", None)
    if shards is None:
      total += int(np.asarray(leaf).nbytes)
    else:
      total += sum(int(s.data.nbytes) for s in shards if s.replica_id == 0)
  return total


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler()}


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """``{"params/layers/mlp/up/kernel": shape}`` for a train state, abstract tree or metadata."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def check_shapes(stored: PyTree, target: PyTree, where: str, *, prefix: str = "") -> None:
  """Raises :class:`~jkd.errors.CheckpointMismatchError` (a ``ValueError``) naming the
  first arrays whose stored shape differs from target's.

  Args:
    stored: checkpoint metadata (or any tree of objects with ``.shape``).
    target: the abstract tree the run expects.
    where: the checkpoint's path, for the message.
    prefix: compare only the entries under this path (e.g. ``"params/"``).
  """
  have = {k: v for k, v in _flat_shapes(stored).items() if k.startswith(prefix)}
  want = {k: v for k, v in _flat_shapes(target).items() if k.startswith(prefix)}
  # Parameters first: the optimizer's moments repeat the same mismatch.
  order = lambda k: (not k.startswith("params/"), k)  # noqa: E731
  diff = [f"{k}: checkpoint {have[k]} vs model {want[k]}"
          for k in sorted(set(have) & set(want), key=order) if have[k] != want[k]]
  missing = sorted(set(want) - set(have), key=order)
  extra = sorted(set(have) - set(want), key=order)
  if diff or missing or extra:
    lines = diff[:5] + [f"{k}: missing in the checkpoint" for k in missing[:3]] + [
        f"{k}: in the checkpoint but not in the model" for k in extra[:3]]
    more = len(diff) + len(missing) + len(extra) - len(lines)
    what = ("the model" if any(k.startswith("params/") for k in diff_keys(have, want))
            else "the optimizer's or the objective's state")
    raise CheckpointMismatchError(
        f"the checkpoint at {where} holds arrays of other shapes than this run's ({what}"
        " differs):\n  " + "\n  ".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
        + "\nUse the config it was saved with, or a new workdir. The checkpoint was left"
        " untouched.")


def diff_keys(have: Mapping[str, tuple], want: Mapping[str, tuple]) -> list[str]:
  """The flat keys present in only one of two shape dicts, or with different shapes."""
  return sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))


class Checkpointer:
  """Saves and restores ``(train state, data state, config)`` under ``directory``.

  Args:
    directory: where the step directories live (created by the first save).
    keep: how many of the newest checkpoints to keep.
    best_metric: also keep the checkpoint with the best value of this metric (pass it to
      :meth:`save` as ``metrics``); ``None`` or ``""`` for none.
    best_mode: ``"min"`` or ``"max"``.
    async_save: write in a background thread (the call returns once the arrays are on the
      host).
    config: JSON-serialisable dict stored with every checkpoint (the resolved run config).

  Raises:
    CheckpointError: the directory holds checkpoints that cannot be read.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "min", async_save: bool = True,
               config: Mapping[str, Any] | None = None):
    if keep < 1:
      raise ValueError(f"keep must be >= 1 (got {keep}).")
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max' (got {best_mode!r}).")
    self.directory = storage.resolve(directory)
    self.config = dict(config or {})
    self.best_metric = best_metric or None
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    if self.best_metric:
      name = self.best_metric
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[name], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=False)  # Made by the first save.
    self._pending: int | None = None  # The step of the save in flight.
    self._broken = False  # A save failed: the manager's threads are not waited for.
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=_handlers())
    except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable files)
      code = errors.find_errno(e)
      if code in errors.WRITE_ERRNOS:
        raise SaveError(f"cannot create the checkpoint directory {self.directory}:"
                        f" {errors.errno_text(code)}.", errno=code,
                        filename=self.directory) from e
      raise CheckpointError(f"cannot open the checkpoints in {self.directory} ({_brief(e)})."
                            " Move the folder aside or use a new workdir.") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {self.step_path(step)} cannot be read ({_brief(e)}). It may be"
        " corrupted or incomplete; it was left untouched. Move it aside (e.g. `mv"
        f" {self.step_path(step)} {self.step_path(step)}.bad`) to resume from the previous"
        " checkpoint, or use a new workdir.")

  def restore(self, abstract_state: PyTree, step: int | None = None
              ) -> tuple[int, PyTree, dict, dict] | None:
    """The newest (or ``step``'s) checkpoint as ``(step, state, data_state, config)``.

    Args:
      abstract_state: the state's ``jax.ShapeDtypeStruct`` tree, each with its ``sharding``:
        the arrays are read straight into those shardings.
      step: a specific step; default the newest.

    Returns:
      None when there is no checkpoint.

    Raises:
      ValueError: the stored shapes differ from ``abstract_state``'s.
      CheckpointError: the checkpoint cannot be read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    try:
      metadata = self._manager.item_metadata(step)["state"]
      if metadata is None:
        raise FileNotFoundError("the 'state' item is missing")
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e
    check_shapes(metadata, abstract_state, self.step_path(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore()))
      if restored["data"] is None:
        raise FileNotFoundError("the 'data' item (the data position) is missing")
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e
    return step, restored["state"], dict(restored["data"]), dict(restored["config"] or {})

  def save(self, step: int, state: PyTree, data_state: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> bool:
    """Starts saving ``step`` (returns once the arrays are copied; see :meth:`wait`).

    Returns:
      False when ``step`` is already saved (nothing is written).
    """
    if self._broken:
      raise SaveError(f"an earlier checkpoint save in {self.directory} failed; not saving step"
                      f" {step}.", filename=self.directory)
    if step in self.all_steps():
      return False
    self.check_space(step, state_bytes(state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(dict(data_state)),
                              config=ocp.args.JsonSave(self.config))
    try:
      saved = self._manager.save(step, args=args, metrics=dict(metrics) if metrics else None,
                                 force=True)
    except Exception as e:  # noqa: BLE001 (this save's, or the previous async save's, failure)
      raise self._failed(step, e) from e
    self._pending = step
    return saved

  def check_space(self, step: int, nbytes: int) -> None:
    """Raises :class:`SaveError` before anything is written when ``directory`` takes no write
    (read-only, no permission) or has less free space than ``nbytes`` plus a margin; every
    process checks, and all raise when one does."""
    code, detail = 0, ""
    try:
      if storage.is_remote(self.directory):  # Object storage: a write, no space to count.
        storage.probe_write(self.directory)
        raise _Skip
      os.makedirs(self.directory, exist_ok=True)
      fd, probe = tempfile.mkstemp(prefix=".jkd-write-probe-", dir=self.directory)
      os.close(fd)
      os.remove(probe)
      free, need = shutil.disk_usage(self.directory).free, nbytes + nbytes // 10 + _SPACE_MARGIN
      if free < need:
        code, detail = errno_lib.ENOSPC, f" (the step needs about {_mib(need)}; {_mib(free)} free)"
    except _Skip:
      pass
    except TimeoutError as e:
      code, detail = errno_lib.ETIMEDOUT, f" ({e})"
    except OSError as e:
      code = e.errno or errno_lib.EIO
      if storage.is_remote(self.directory):
        detail = f" ({_brief(e)})"
    except Exception as e:  # noqa: BLE001 (object-storage clients raise their own types)
      code, detail = errno_lib.EIO, f" ({_brief(e)})"
    if jax.process_count() > 1:  # All processes stop together, or none does.
      codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel()
      if not code and codes.any():
        code = int(codes[codes != 0][0])
        detail = f" (on process {int(np.flatnonzero(codes)[0])})"
    if code:
      raise SaveError(self._message(step, code, detail), errno=code, filename=self.directory)

  def _message(self, step: int, code: int | None, detail: str = "") -> str:
    kept = self.all_steps()
    have = (f"the checkpoints already saved ({', '.join(map(str, kept))}) are intact, and a"
            " rerun resumes from the newest" if kept else "no checkpoint was saved yet")
    fix = {errno_lib.ENOSPC: "free space there", errno_lib.EDQUOT: "free space there",
           errno_lib.EROFS: "make it writable", errno_lib.EACCES: "make it writable",
           errno_lib.EPERM: "make it writable"}.get(code, "check the file system")
    return (f"cannot write checkpoint {step} to {self.directory}: {errors.errno_text(code)}"
            f"{detail}. Nothing partial was kept; {have}. To go on, {fix} or use a workdir on"
            " another disk.")

  def _failed(self, step: int | None, e: BaseException) -> SaveError:
    """A failed (possibly asynchronous) save as a :class:`SaveError`: the partial step
    directories are removed and the manager is given up."""
    self._broken = True
    step = self._pending if self._pending is not None else step
    self._pending = None
    if jax.process_index() == 0:
      self.remove_partial()
    code = errors.find_errno(e)
    detail = "" if code is not None else f" ({_brief(e)})"
    return SaveError(self._message(step, code, detail), errno=code, filename=self.directory)

  def remove_partial(self) -> list[str]:
    """Removes the ``<step>.orbax-checkpoint-tmp`` directories of incomplete saves."""
    removed = []
    try:
      names = storage.listdir(self.directory)
    except OSError:
      return removed
    for name in names:
      if name.endswith(TMP_SUFFIX):
        path = storage.join(self.directory, name)
        storage.rmtree(path)
        removed.append(path)
    return removed

  def wait(self) -> None:
    """Blocks until the pending save is on disk.

    Raises:
      SaveError: the save failed (its partial directory is removed).
    """
    if self._broken:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failed(None, e) from e
    self._pending = None

  def close(self) -> None:
    """Releases the manager (not after a failed save: its threads may wait on the failed
    write; :mod:`jkd.train.__main__` exits without joining them)."""
    if not self._broken:
      self._manager.close()


def find_checkpoint(path: str) -> str:
  """The newest step directory under ``path`` (a workdir, its checkpoints dir, or a step dir)."""
  path = storage.resolve(path)

  def complete(step_dir: str) -> bool:
    # Locally a save is renamed into place when done; in object storage (no renames) orbax
    # writes the step's folder directly and marks it done with commit_success.txt last.
    return storage.isdir(storage.join(step_dir, "state")) and (
        not storage.is_remote(step_dir)
        or storage.exists(storage.join(step_dir, "commit_success.txt")))

  for candidate in (path, storage.join(path, "checkpoints")):
    if complete(candidate):
      return candidate
    if storage.isdir(candidate):
      steps = [int(n) for n in storage.listdir(candidate) if n.isdigit()
               and complete(storage.join(candidate, n))]
      if steps:
        return storage.join(candidate, str(max(steps)))
  raise FileNotFoundError(f"no jkd checkpoint under {path!r} (looked for <step>/state in it and"
                          " in its checkpoints/ folder).")


def restore_params(path: str, abstract_params: PyTree) -> PyTree:
  """Only the student parameters of a checkpoint (for ``init_from``), into their shardings.

  Args:
    path: a workdir, its ``checkpoints`` folder, or one step directory.
    abstract_params: ``jax.ShapeDtypeStruct`` tree of the parameters, with shardings.

  Raises:
    FileNotFoundError: no checkpoint under ``path``.
    ValueError: the stored parameter shapes differ.
    CheckpointError: the checkpoint cannot be read.
  """
  step_dir = find_checkpoint(path)
  state_dir = storage.join(step_dir, "state")
  item = {"params": abstract_params}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(state_dir).item_metadata
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} cannot be read ({_brief(e)}).") from e
  check_shapes(metadata, item, step_dir, prefix="params/")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} cannot be read ({_brief(e)}).") from e
  return restored["params"]


def read_config(path: str) -> dict:
  """The config dict stored with the newest checkpoint under ``path`` (see find_checkpoint)."""
  step_dir = find_checkpoint(path)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      return dict(ckptr.restore(storage.join(step_dir, "config")))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} has no readable config ({_brief(e)}).") from e
