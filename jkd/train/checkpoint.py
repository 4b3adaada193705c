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

import os
from typing import Any, Mapping

import orbax.checkpoint as ocp

PyTree = Any

class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be read (corrupted, truncated, foreign files)."""


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler()}


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """``{"params/layers/mlp/up/kernel": shape}`` for a train state, abstract tree or metadata."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, "shape")}


def check_shapes(stored: PyTree, target: PyTree, where: str, *, prefix: str = "") -> None:
  """Raises ``ValueError`` naming the first parameters whose stored shape differs from target's.

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
    raise ValueError(f"the checkpoint at {where} is of another model shape than this run's:\n  "
                     + "\n  ".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
                     + "\nUse the model config it was saved with, or a new workdir. The"
                     " checkpoint was left untouched.")


class Checkpointer:
  """Saves and restores ``(train state, data state, config)`` under ``directory``.

  Args:
    directory: where the step directories live (created if missing).
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
    self.directory = os.path.abspath(directory)
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
        enable_async_checkpointing=async_save, create=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=_handlers())
    except Exception as e:  # noqa: BLE001 (orbax raises many types for unreadable files)
      raise CheckpointError(f"cannot open the checkpoints in {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _unreadable(self, step: int, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {self.step_path(step)} cannot be read ({type(e).__name__}: {e}). It may be"
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
    if step in self.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(dict(data_state)),
                              config=ocp.args.JsonSave(self.config))
    return self._manager.save(step, args=args, metrics=dict(metrics) if metrics else None,
                              force=True)

  def wait(self) -> None:
    """Blocks until the pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def find_checkpoint(path: str) -> str:
  """The newest step directory under ``path`` (a workdir, its checkpoints dir, or a step dir)."""
  for candidate in (path, os.path.join(path, "checkpoints")):
    if os.path.isdir(os.path.join(candidate, "state")):
      return candidate
    if os.path.isdir(candidate):
      steps = [int(n) for n in os.listdir(candidate) if n.isdigit()
               and os.path.isdir(os.path.join(candidate, n, "state"))]
      if steps:
        return os.path.join(candidate, str(max(steps)))
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
  state_dir = os.path.join(step_dir, "state")
  item = {"params": abstract_params}
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(state_dir).item_metadata
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} cannot be read ({type(e).__name__}: {e}).") from e
  check_shapes(metadata, item, step_dir, prefix="params/")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} cannot be read ({type(e).__name__}: {e}).") from e
  return restored["params"]


def read_config(path: str) -> dict:
  """The config dict stored with the newest checkpoint under ``path`` (see find_checkpoint)."""
  step_dir = find_checkpoint(path)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      return dict(ckptr.restore(os.path.join(step_dir, "config")))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"checkpoint {step_dir} has no readable config ({e}).") from e
