"""jkd.runtime: the host allocator settings of the command-line entry points."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
