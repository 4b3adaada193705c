"""Lazy public names of a package: each imported from its module on first use (PEP 562)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
  """``(__getattr__, __dir__)`` for ``package`` whose public name ``n`` lives in the module
  ``package + "." + exports[n]`` (or ``exports[n]`` itself when it starts with ``jkd.``);
  assign them at the end of the package's ``__init__``."""
  namespace = importlib.import_module(package).__dict__

  def __getattr__(name):  # noqa: N807
    if name in exports:
      module = exports[name]
      module = module if module.startswith("jkd.") else f"{package}.{module}"
      value = getattr(importlib.import_module(module), name)
      namespace[name] = value
      return value
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__():  # noqa: N807
    return sorted(set(namespace) | set(exports))

  return __getattr__, __dir__
