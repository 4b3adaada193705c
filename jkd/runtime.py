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
On a GPU or TPU those buffers live in the accelerator's memory (JAX's own allocator already
reuses it), so the settings would only keep the host memory at its peak: they are applied only
when the process computes on the CPU (:func:`computes_on_host`).

**Backend.** A few of jkd's code paths exist for XLA:CPU alone: the decode step's transposed
weights and optimization barriers (:mod:`jkd.sampling.decode`), the 2-D products of
:mod:`jkd.precision` and the host allocator. :func:`xla_cpu` chooses them at trace time; on a
GPU or TPU the plain forms run.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys

#: Environment variable: ``system`` (or ``0``, ``off``) keeps glibc's default allocator settings;
#: ``reuse`` applies :func:`tune_host_allocator`'s settings even when the process computes on an
#: accelerator; unset (or ``auto``), they are applied when it computes on the CPU.
ALLOCATOR_ENV = "JKD_HOST_ALLOCATOR"

#: Device files of the accelerators that JAX computes on when its plugin for them is installed:
#: ``(module of the plugin, device files)`` (NVIDIA, WSL2 and AMD GPUs; TPU VMs, v4 and v5+).
ACCELERATOR_FILES = (
    ("jax_plugins", ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")),
    ("libtpu", ("/dev/accel0", "/dev/vfio/0")),
)


def backend() -> str:
  """JAX's default backend, ``"cpu"``, ``"gpu"`` or ``"tpu"`` (starts the backends if needed)."""
  import jax  # noqa: PLC0415  (jkd.runtime is imported first by the entry points; keep it light)
  return jax.default_backend()


def xla_cpu() -> bool:
  """Whether code traced now is compiled for XLA:CPU: the default backend is the CPU.

  jkd's XLA:CPU-only forms (:mod:`jkd.sampling.decode`'s ``[out, in]`` weights and optimization
  barriers, :mod:`jkd.precision`'s 2-D products) are chosen with it at trace time, so a GPU or
  TPU run compiles the plain forms, which give the same numbers (up to the order of float
  sums). Computations that a GPU or TPU process places on its CPU devices take the plain forms
  too: correct, only not the fastest ones there.
  """
  return backend() == "cpu"


def computes_on_host() -> bool:
  """Whether this process's JAX computations will run on the CPU, decided without starting a
  JAX backend (``jax.distributed.initialize`` must come before that).

  The first platform of ``JAX_PLATFORMS`` decides when it is set (``cpu``: yes; ``cuda``,
  ``tpu``, ...: no). Otherwise JAX picks an accelerator when its plugin is installed and the
  device is there (:data:`ACCELERATOR_FILES`): the test extra's libtpu alone, on a machine with
  no TPU, still computes on the CPU.
  """
  platforms = (os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME") or "")
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  for module, files in ACCELERATOR_FILES:
    if any(os.path.exists(f) for f in files) and importlib.util.find_spec(module) is not None:
      return False
  return True

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_host_allocator() -> bool:
  """Makes glibc's malloc reuse freed host memory instead of returning it to the system.

  Sets, through ``mallopt(3)``: one malloc arena (the threads of XLA's pool allocate from the
  same heap that Python's thread frees into), no ``mmap`` for large blocks, and no trimming of
  the heap. Call it before the first large allocation (jkd's ``python -m`` entry points call it
  first); it affects the whole process. Does nothing (returns ``False``) off Linux/glibc, when
  the process computes on a GPU or TPU (:func:`computes_on_host`; :data:`ALLOCATOR_ENV` ``reuse``
  applies the settings all the same) or when :data:`ALLOCATOR_ENV` is ``system``.

  Returns:
    Whether the settings were applied.
  """
  setting = os.environ.get(ALLOCATOR_ENV, "").strip().lower()
  if setting in ("system", "0", "off", "false"):
    return False
  if setting != "reuse" and not computes_on_host():
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
  """What every jkd entry point applies first: :func:`quiet_libraries`, :func:`tune_host_allocator`
  (which applies its settings only when the process computes on the CPU)."""
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
