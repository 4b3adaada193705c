"""jkd.runtime: the host allocator settings of the command-line entry points."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jkd import runtime

# In a fresh process: allocate, free and allocate again 256 MiB, counting the page faults of
# the second allocation (the first one grows the heap either way).
CHILD = """
import ctypes, resource, sys
from jkd import runtime
applied = runtime.tune_host_allocator() if sys.argv[1] == "tune" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def faults():  # what XLA's buffers go through: malloc, first touch, free
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(2**28)
  ctypes.memset(p, 1, 2**28)
  libc.free(p)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(applied, faults())
"""

def child(mode: str, **env) -> tuple[str, int]:
  out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                       check=True, env={**os.environ, **env}).stdout.split()
  return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
  applied, tuned = child("tune")
  assert applied == "True"
  assert tuned < 1000  # the freed 256 MiB came back from the heap, already mapped
  _, default = child("default")
  assert default > 2**28 // 4096 // 2  # glibc's default: fresh pages (65536 pages of 4 KiB)


def test_the_environment_variable_keeps_the_system_settings():
  applied, faults = child("tune", JKD_HOST_ALLOCATOR="system")
  assert applied == "False" and faults > 2**28 // 4096 // 2


def test_not_tuned_for_an_accelerator_unless_asked():
  # JAX_PLATFORMS is only read (no backend starts): a GPU or TPU process keeps glibc's settings.
  for platforms in ("cuda", "tpu,cpu"):
    applied, faults = child("tune", JAX_PLATFORMS=platforms)
    assert applied == "False" and faults > 2**28 // 4096 // 2
  applied, faults = child("tune", JAX_PLATFORMS="cuda", JKD_HOST_ALLOCATOR="reuse")
  assert applied == "True" and faults < 1000


@pytest.mark.parametrize("platforms, on_host", [("cpu", True), ("cpu,cuda", True),
                                                ("cuda", False), ("tpu", False),
                                                ("gpu,cpu", False)])
def test_computes_on_host_reads_jax_platforms(monkeypatch, platforms, on_host):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert runtime.computes_on_host() is on_host


def test_computes_on_host_without_jax_platforms(monkeypatch, tmp_path):
  # Unset, an accelerator counts when its device file is there and JAX's plugin for it is
  # installed ("jkd" and "numpy" stand in for the plugin modules).
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
  device = tmp_path / "nvidia0"
  missing = str(tmp_path / "accel0")
  monkeypatch.setattr(runtime, "ACCELERATOR_FILES", (("jkd", (str(device),)),
                                                     ("numpy", (missing,))))
  assert runtime.computes_on_host()  # no device file
  device.touch()
  assert not runtime.computes_on_host()
  monkeypatch.setattr(runtime, "ACCELERATOR_FILES", (("no_such_plugin_jkd", (str(device),)),))
  assert runtime.computes_on_host()  # a GPU, but JAX without its plugin computes on the CPU
