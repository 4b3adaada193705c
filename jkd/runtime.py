"""Process-level settings for jkd's command-line entry points (:func:`prepare_process`).

**Quiet start.** transformers prints "PyTorch was not found. Models won't be available..." when
it is imported without PyTorch. jkd needs only its tokenizers and configs, never its PyTorch
models, so the entry points turn such advisory lines off (:func:`quiet_libraries`).

**Host memory.**
XLA:CPU allocates a step's large buffers anew at every call: the ``[tokens, vocab]`` logits of
both models, their gradients and the step's temporary buffer (2 GiB for the benchmark's
distillation step). glibc serves allocations of more than 32 MiB with fresh ``mmap`` pages and
returns them to the system when freed, so the kernel faults in and zeroes every page of every
large buffer at every step. :func:`tune_host_allocator` makes glibc keep freed memory for reuse
instead, as the caching allocators of other frameworks do (``bench/train_step.py`` measures the
effect). The resident memory then stays at its peak rather than shrinking between steps.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

#: Environment variable: ``system`` (or ``0``, ``off``) keeps glibc's default allocator settings.
ALLOCATOR_ENV = "JKD_HOST_ALLOCATOR"

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_host_allocator() -> bool:
  """Makes glibc's malloc reuse freed host memory instead of returning it to the system.

  Sets, through ``mallopt(3)``: one malloc arena (the threads of XLA's pool allocate from the
  same heap that Python's thread frees into), no ``mmap`` for large blocks, and no trimming of
  the heap. Call it before the first large allocation (jkd's ``python -m`` entry points call it
  first); it affects the whole process. Does nothing (returns ``False``) off Linux/glibc or when
  :data:`ALLOCATOR_ENV` is ``system``.

  Returns:
    Whether the settings were applied.
  """
  if os.environ.get(ALLOCATOR_ENV, "").strip().lower() in ("system", "0", "off", "false"):
    return False
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  # A trim threshold of -1 (SIZE_MAX once glibc converts it) never trims.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)


#: Environment settings that silence third-party start-up banners which read like errors; an
#: existing value of the user's is kept.
QUIET_ENV = {
    # transformers' "PyTorch was not found..." (jkd uses its tokenizers, not its models).
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def quiet_libraries() -> None:
  """Silences third-party advisory banners (:data:`QUIET_ENV`) for this process.

  Call it before those libraries are imported; a variable the user has set keeps its value.
  """
  for name, value in QUIET_ENV.items():
    os.environ.setdefault(name, value)


def prepare_process() -> None:
  """What every jkd entry point applies first: :func:`quiet_libraries`, :func:`tune_host_allocator`."""
  quiet_libraries()
  tune_host_allocator()


def require(module: str, feature: str, extra: str = "train") -> None:
  """Raises a clear ``ImportError`` when ``module`` is not installed.

  The library core (``pip install jkd``) holds the losses, models and sampler; the engine, the
  data pipelines and the tokenizers need ``jkd[train]``.

  Args:
    module: the top-level module a feature imports, e.g. ``"transformers"``.
    feature: what needs it, for the message.
    extra: the install extra that brings it.

  Raises:
    ImportError: naming the feature, the module and the install command.
  """
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{feature} needs the {module!r} package, which the core install of jkd"
                      f" does not include: pip install 'jkd[{extra}]'") from e
