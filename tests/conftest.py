"""Shared fixtures for the jkd tests.

Test data comes from NumPy generators seeded per test (never from a global RNG flag), so each
test sees the same numbers whichever others run, in whatever order.
"""

from __future__ import annotations

import os
import zlib

# The test extra installs libtpu (the TPU compiler of tests/test_plan.py). A JAX process that
# may use a TPU loads it and holds its one-process lock; the suite's processes (and the
# subprocesses they start, which inherit this) are CPU-only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.experimental  # noqa: E402,F401  (enable_x64 on older JAX)
import numpy as np  # noqa: E402
import pytest  # noqa: E402


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
