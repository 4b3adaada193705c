"""How a run fails: the engine's error classes and the exit codes of ``python -m jkd.train``.

Every failure a user can cause or meet (a bad config, data or model file, an unreadable or
mismatched checkpoint, a full disk) is raised as an exception whose message names the input and
the fix; the command line prints it as one ``error: ...`` line and exits with the code of its
class (:func:`describe`). The traceback is printed only with ``--verbosity=1`` or
``JKD_TRACEBACK=1``.

=====  =====================================================================================
code   meaning
=====  =====================================================================================
0      done, or preempted (SIGTERM) after saving
1      an internal error: a bug in jkd (the message says how to get the traceback)
2      bad input: command line, config, data or model files (nothing was written)
3      too many non-finite steps in a row (:class:`NonFiniteError`)
4      a checkpoint that cannot be resumed: unreadable (:class:`CheckpointError`), of another
       shape or saved with another config (:class:`CheckpointMismatchError`,
       :class:`ConfigChangedError`); it is left untouched
5      a file cannot be written: no space, read-only, no permission (:class:`SaveError`)
6      another process of a multi-process run failed (:mod:`jkd.train.distributed`)
130    interrupted with Ctrl-C
=====  =====================================================================================
"""

from __future__ import annotations

import errno as errno_lib
import os
import re
import sys
import traceback
from typing import Any, Callable

EXIT_DONE, EXIT_INTERNAL, EXIT_INPUT, EXIT_NONFINITE = 0, 1, 2, 3
EXIT_CHECKPOINT, EXIT_WRITE, EXIT_PEER = 4, 5, 6

#: ``errno`` values that mean "this file system does not take the write".
WRITE_ERRNOS = frozenset({errno_lib.ENOSPC, errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM,
                          errno_lib.EDQUOT, errno_lib.EFBIG})

_MAX_LINES = 12


class RunError(Exception):
  """A failure of a run with its own exit code (:data:`exit_code`)."""
  exit_code = EXIT_INTERNAL


class NonFiniteError(RunError, RuntimeError):
  """Too many non-finite (skipped) steps in a row; the run stopped without saving."""
  exit_code = EXIT_NONFINITE


class CheckpointError(RunError, RuntimeError):
  """A checkpoint that exists but cannot be read (corrupted, truncated, foreign files)."""
  exit_code = EXIT_CHECKPOINT


class CheckpointMismatchError(RunError, ValueError):
  """A readable checkpoint that this run cannot continue (another model or state shape)."""
  exit_code = EXIT_CHECKPOINT


class ConfigChangedError(CheckpointMismatchError):
  """The config differs from the checkpoint's in keys that change what the run computes."""


class SaveError(RunError, OSError):
  """A checkpoint (or another file of the run) that cannot be written.

  Attributes:
    errno: the operating system's error number (e.g. ``errno.ENOSPC``), or None.
    filename: the path that could not be written.
  """
  exit_code = EXIT_WRITE

  def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None):
    super().__init__(message)
    self.errno, self.filename = errno, filename

  def __str__(self) -> str:
    return self.args[0]


def find_errno(e: BaseException) -> int | None:
  """The OS error number behind ``e``: its own, its causes', or one quoted in their messages
  (TensorStore and orbax report ``[os_error_code='28']`` or ``[Errno 28]`` in the text)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    m = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(e))
    if m:
      return int(m.group(1) or m.group(2))
    e = e.__cause__ or e.__context__
  return None


def errno_text(code: int | None) -> str:
  """``"[Errno 28] No space left on device"`` (or ``"unknown error"``)."""
  if code is None:
    return "unknown error"
  return f"[Errno {code}] {os.strerror(code)}"


def _brief(text: str) -> str:
  lines = text.strip().splitlines() or [""]
  if len(lines) > _MAX_LINES:
    lines = lines[:_MAX_LINES] + [f"... ({len(lines) - _MAX_LINES} more lines; JKD_TRACEBACK=1"
                                  " shows the traceback)"]
  return "\n".join(lines)


def describe(e: BaseException, *, where: str | None = None) -> tuple[int, str]:
  """``(exit code, message)`` for an exception that ended a run (see the module docstring).

  Known classes keep their message; a write that the file system refused (an ``OSError``, or
  another library's error quoting the errno) is exit code 5, its path or else ``where`` (e.g.
  the workdir) named; ``ValueError``, ``TypeError`` and other ``OSError``s (a missing or unreadable
  path) are bad input (2); anything else is an internal error (1) whose message asks for the
  traceback.

  >>> describe(FileNotFoundError(2, "No such file or directory", "/data/x.npz"))
  (2, "[Errno 2] No such file or directory: '/data/x.npz'")
  >>> describe(OSError(28, "No space left on device", "/w/metrics.jsonl"))
  (5, 'cannot write /w/metrics.jsonl: [Errno 28] No space left on device.')
  """
  if isinstance(e, RunError):
    return e.exit_code, _brief(str(e))
  code = find_errno(e)
  if code in WRITE_ERRNOS and not isinstance(e, FileNotFoundError):
    path = getattr(e, "filename", None) or (f"under {where}" if where else "")
    detail = "" if isinstance(e, OSError) else f" ({type(e).__name__}: {_brief(str(e))})"
    what = ("no permission for" if code in (errno_lib.EACCES, errno_lib.EPERM)
            else "cannot write")
    return EXIT_WRITE, f"{what}{' ' + str(path) if path else ''}: {errno_text(code)}{detail}."
  if isinstance(e, (ValueError, TypeError)):
    return EXIT_INPUT, _brief(str(e))
  if isinstance(e, OSError):  # A path that is missing, of the wrong kind, or unreadable.
    return EXIT_INPUT, _brief(str(e))
  first = (str(e).strip().splitlines() or [""])[0][:300]
  return EXIT_INTERNAL, (f"internal error ({type(e).__name__}: {first}). This is likely a bug"
                         " in jkd: rerun with JKD_TRACEBACK=1 for the traceback and report it.")


def traceback_wanted() -> bool:
  """Whether ``JKD_TRACEBACK`` asks for tracebacks (set and not ``0``)."""
  return os.environ.get("JKD_TRACEBACK", "") not in ("", "0")


def report(e: BaseException, *, with_traceback: bool = False, where: str | None = None) -> int:
  """Prints ``error: <message>`` for ``e`` on stderr (after its traceback when asked) and
  returns its exit code (:func:`describe`; ``where``: the folder a failed write went to)."""
  code, message = describe(e, where=where)
  if with_traceback or traceback_wanted():
    traceback.print_exception(e, file=sys.stderr)
  print(f"error: {message}", file=sys.stderr, flush=True)
  return code


def run_main(main: Callable[[], Any]) -> None:
  """Runs a command-line entry point: exits 0 when it returns, and with the code of
  :func:`report` (one ``error:`` line) when it raises."""
  try:
    main()
  except Exception as e:  # noqa: BLE001 (every failure becomes one line and an exit code)
    sys.exit(report(e))
  sys.exit(0)
