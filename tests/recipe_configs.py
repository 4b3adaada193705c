"""Loading the recipes of ``configs/`` in tests: one helper instead of a copy per test file."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(name: str) -> str:
  return os.path.join(ROOT, "configs", f"{name}.py")


def load_module(name: str):
  """The module of ``configs/<name>.py`` (executed anew on each call)."""
  spec = importlib.util.spec_from_file_location(f"jkd_config_{name}", config_path(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``."""
  return load_module(name).get_config(arg)
