"""Logical axis names -> mesh shardings, and the sharding constraints on activations.

Parameters and activations carry logical axis names (``embed``, ``mlp``, ``batch``,
``activation_vocab``, ...); a table of rules (``jkd.train.sharding.DEFAULT_RULES``) maps them to
mesh axes. :func:`logical_to_spec` turns names into a ``PartitionSpec`` (a dimension that its
mesh axes do not divide is replicated, so any model runs on any mesh).

The models and the fused losses call :func:`constrain` on their activations: inside
:func:`activation_sharding` (the engine enters it while tracing its jitted steps) that is
``jax.lax.with_sharding_constraint`` to the named axes on the run's mesh, which keeps every
activation batch-sharded under FSDP (weights are gathered; the products are not split along the
hidden dimension). Outside it, on one device or in a user's own ``jit``, it does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("jkd_activation_sharding",
                                                          default=None)


def mesh_axes(logical: str | None, rules: Sequence[tuple[str, Any]] | dict) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to (``()`` when replicated or unknown)."""
  if logical is None:
    return ()
  target = dict(rules).get(logical)
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_spec: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
  """Mesh ``PartitionSpec`` for an array with these logical axes (undividable dims replicated,
  and a mesh axis used at most once)."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(logical_spec, shape):
    axes = tuple(a for a in mesh_axes(name, table) if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """While tracing inside this context, :func:`constrain` pins activations to ``mesh``."""
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """``x`` constrained to the sharding of its logical axes (one name or None per dimension)
  on the mesh of the enclosing :func:`activation_sharding`; ``x`` itself outside one."""
  context = _CONTEXT.get()
  if context is None:
    return x
  mesh, rules = context
  if len(logical) != x.ndim:
    raise ValueError(f"logical axes {tuple(logical)} do not match an array of shape {x.shape}.")
  spec = logical_to_spec(logical, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def context_key():
  """The enclosing :func:`activation_sharding`'s ``(mesh, rules)`` (None outside one): part
  of the cache key of a program traced inside it."""
  return _CONTEXT.get()


def batch_shards() -> int:
  """How many devices share the ``batch`` axis in the enclosing :func:`activation_sharding`
  (1 outside one)."""
  context = _CONTEXT.get()
  if context is None:
    return 1
  mesh, rules = context
  return math.prod(mesh.shape[a] for a in mesh_axes("batch", rules))
