"""Device meshes and the one table of logical-axis rules (MaxText style).

Parameters and activations carry logical axis names (``embed``, ``mlp``, ``heads``, ``vocab``,
``batch``, ``activation_*``, ...); :data:`DEFAULT_RULES` maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. A dimension that a mesh axis does not divide is replicated instead (and
reported by :func:`describe`), so any model runs on any mesh. Activations are pinned to these
rules while the engine traces its steps (:func:`jkd.partitioning.activation_sharding`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jkd import partitioning

MESH_AXES = ("data", "fsdp", "tensor")

#: logical axis -> mesh axis (or axes, or None = replicated). Parameters: ``vocab`` ...
#: ``layers``. Activations: ``batch`` (rows: over ``data`` and ``fsdp``, so FSDP gathers weights
#: and keeps every activation batch-sharded), ``activation_length``, ``activation_embed``
#: (replicated), ``activation_heads``/``activation_kv_heads``/``activation_mlp``/
#: ``activation_vocab`` (over ``tensor``), as MaxText's ``activation_*`` rules.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("experts", None),
    ("layers", None),
)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh; one ``-1`` entry takes the remaining devices.

  Raises:
    ValueError: the shape does not fit the device count (naming both and a fitting shape).
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  shape = [int(s) for s in shape]
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for the"
                     f" axes {MESH_AXES}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {tuple(shape)}: use positive sizes and at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not fit {n} devices: {n} is not a"
                       f" multiple of {known}. Try ({n}, 1, 1).")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {n} are"
                     f" available. Use -1 for one axis, e.g. (-1, 1, 1).")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


_mesh_axes = partitioning.mesh_axes


def logical_to_spec(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
  """Mesh ``PartitionSpec`` for an array with these logical axes (undividable dims replicated)."""
  return partitioning.logical_to_spec(tuple(logical_spec), shape, mesh, rules)


def shardings_for(abstract_tree: Any, logical_tree: Any, mesh: Mesh,
                  rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """``NamedSharding`` for every leaf of ``abstract_tree`` from its logical spec."""
  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, x.shape, mesh,
                                                                          rules)),
                      logical_tree, abstract_tree, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                   ndim: int = 2) -> NamedSharding:
  """Sharding of a ``[batch, ...]`` array: the batch over the ``batch`` rule's mesh axes."""
  axes = tuple(a for a in _mesh_axes("batch", dict(rules)) if mesh.shape[a] > 1)
  first = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (ndim - 1))))


def describe(shardings: Any) -> str:
  """One line per distinct sharding spec, for the startup log."""
  specs: dict[str, int] = {}
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    specs[str(s.spec)] = specs.get(str(s.spec), 0) + 1
  return "; ".join(f"{k} x{v}" for k, v in sorted(specs.items()))


def state_shardings(abstract_state: Any, param_shardings: Any, optimizer: Any,
                    mesh: Mesh) -> Any:
  """Shardings of a whole :class:`jkd.train.TrainState`: parameter-shaped optimizer slots
  (Adam's moments) follow their parameter; everything else (the loss terms' small parameters
  and their optimizer state included) is replicated."""
  import optax
  replicated = NamedSharding(mesh, PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state,
                              param_shardings, transform_non_params=lambda _: replicated)
  return abstract_state.replace(
      step=replicated, params=param_shardings, opt_state=opt,
      objective_state=jax.tree.map(lambda _: replicated, abstract_state.objective_state),
      nan_streak=replicated, skipped=replicated,
      term_params=jax.tree.map(lambda _: replicated, abstract_state.term_params),
      term_opt_state=jax.tree.map(lambda _: replicated, abstract_state.term_opt_state))


class BatchPlacer:
  """Per-process numpy batches -> global arrays sharded over the ``batch`` rule's mesh axes."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def shardings(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.sharding.Sharding]:
    """Shardings for batches like ``batch`` (checked: each process holds its own rows)."""
    out = {k: batch_sharding(self.mesh, self.rules, ndim=np.ndim(v))
           for k, v in batch.items()}
    name = next((k for k in ("tokens", "chosen_tokens") if k in batch), next(iter(batch)))
    rows, *rest = np.shape(batch[name])
    total = rows * jax.process_count()
    slices = {index[0].indices(total)[:2] for index in
              out[name].addressable_devices_indices_map((total, *rest)).values()}
    if sum(hi - lo for lo, hi in slices) != rows:
      raise ValueError(f"the mesh {dict(self.mesh.shape)} does not split the batch across the"
                       f" {jax.process_count()} processes (each serves {rows} of {total} rows):"
                       " put the processes on the data or fsdp axis.")
    return out

  def place(self, batch: Mapping[str, np.ndarray], shardings: Mapping) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
            for k, v in batch.items()}
