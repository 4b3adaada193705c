"""Shared fixtures for the jkd tests.

Test data comes from NumPy generators seeded per test (never from a global RNG flag), so each
test sees the same numbers whichever others run, in whatever order.
"""

from __future__ import annotations

import zlib

import jax
import jax.experimental  # noqa: F401  (enable_x64 on older JAX)
import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A NumPy generator seeded from the test's id: stable across runs and test selections."""
  return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def x64():
  """64-bit JAX types inside the test (e.g. float64 gradient checks), restored afterwards."""
  experimental = getattr(jax.experimental, "enable_x64", None)  # JAX < 0.7
  with (experimental() if experimental is not None else jax.enable_x64(True)):
    yield
