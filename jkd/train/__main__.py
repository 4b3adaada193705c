"""``python -m jkd.train --config configs/<name>.py[:arg] --workdir DIR [--init_from PATH]
[--allow_config_change KEY,...]``.

Overrides: ``--config.optimizer.lr=3e-4``. The config is locked, so a misspelt key is an error
that names the nearest keys. The resolved config is printed and, once the run is accepted,
saved to ``DIR/config.json``; a workdir with checkpoints resumes from the newest, provided the
config computes what the checkpoint's did (:mod:`jkd.train.resume`; ``--allow_config_change``
accepts named changes, recorded in ``DIR/config_history.jsonl``). Around training,
:func:`jkd.train.stages.run` writes a teacher corpus first (``data.source=teacher_corpus``) and
a report after (``report.enabled``).

A failure prints one line, ``error: <what, where, and the fix>``, and exits with the code of
:mod:`jkd.errors` (0 done or preempted, 1 internal error, 2 bad input, 3 non-finite steps,
4 a checkpoint that cannot be resumed, 5 a file that cannot be written, 6 a failed peer
process; 130 after Ctrl-C). ``--verbosity=1`` or ``JKD_TRACEBACK=1`` also prints the traceback.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import traceback

from jkd import runtime

if __name__ == "__main__":
  runtime.prepare_process()  # Before JAX allocates or transformers is imported.

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from jkd.train import config as config_lib
from jkd.train import distributed
from jkd import errors
from jkd.train import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory (resumed if it has"
                               " checkpoints)")
_INIT_FROM = flags.DEFINE_string("init_from", None, "initialise the student from a Hugging"
                                 " Face directory or a jkd workdir/checkpoint")
_ALLOW = flags.DEFINE_list("allow_config_change", [], "config keys (or sections, e.g."
                           " 'optimizer') that may differ from the checkpoint's when resuming")
flags.mark_flags_as_required(["config", "workdir"])


def _traceback_wanted(argv=None) -> bool:
  if errors.traceback_wanted():
    return True
  if argv is not None:  # Flags not parsed yet.
    return any(re.fullmatch(r"--?v(erbosity)?=?[1-9]\d*", a) for a in argv)
  return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1


def _fail(code: int, message: str, exc: BaseException | None = None, *, argv=None) -> int:
  """Prints ``error: message`` (after the traceback when asked) and returns ``code``."""
  if exc is not None and _traceback_wanted(argv):
    traceback.print_exception(exc, file=sys.stderr)
  print(f"error: {message}", file=sys.stderr, flush=True)
  return code


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  return lines[-1] if lines else text


def _flag_error(e: Exception, argv: list[str]) -> str:
  """One line for an error in the command line, the config file or an override."""
  text = str(e)
  if isinstance(e, KeyError):  # An override into a section the config does not have.
    key = str(e).strip("'\"")
    given = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--config.")]
    name = next((g for g in given if key in g.split(".")), f"config.{key}")
    hint = (f" The optional section {key!r} is added by the recipes that use it (see"
            " jkd.train.config.add_sections)." if key in config_lib.OPTIONAL_SECTIONS else "")
    return f"--{name}: no such config key ({key!r} is not in this config).{hint}"
  if isinstance(e, AttributeError):  # A locked config's unknown key (ml_collections).
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    given = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--config.")]
    name = next((g for g in given if g.split(".")[-1] == key), key)
    return f"--{name}: no such config key. {hint}".strip()
  if isinstance(e, SyntaxError):
    return f"--config: {e.filename} line {e.lineno}: {e.msg}"
  if "Traceback (most recent call last)" in text:  # The config file's get_config raised.
    head = text.split(": Error whilst", 1)[0] if text.startswith("flag --config") else "--config"
    return f"{head.replace('flag ', '')}: {_last_line(text)}"
  if isinstance(e, OSError):  # A config file that cannot be read.
    return f"--config: {_last_line(text)}"
  return text.replace("flag --", "--", 1)


def _check_config_type(config) -> None:
  """The config file's ``get_config()`` must give a training config."""
  config.get("seed")  # A config file that failed to load raises here (a lazy error object).
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f"--config: get_config() returned a {type(config).__name__}, not an"
                     " ml_collections.ConfigDict: start from jkd.train.config.default_config().")
  missing = [k for k in config_lib.default_config() if k not in config]
  if missing:
    raise ValueError(f"--config: the config lacks the sections {missing}; start from"
                     " jkd.train.config.default_config() and change what you need.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors (and the config file's) as one ``error:`` line, exit 2."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_type(_CONFIG.value)  # (A config file that failed to load raises here.)
    return rest
  except Exception as e:  # noqa: BLE001 (any config-file error is the user's input)
    sys.exit(_fail(errors.EXIT_INPUT, f"{_flag_error(e, argv)} (see --help)", e, argv=argv))


def main(argv) -> int:
  if len(argv) > 1:
    return _fail(errors.EXIT_INPUT, f"unexpected arguments: {argv[1:]} (see --help)")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every file it writes at INFO, and each of its threads' failures at ERROR:
    # jkd reports what failed in one line instead.
    logging.set_verbosity(logging.FATAL)
  config = _CONFIG.value
  try:
    if _INIT_FROM.value:
      config.student.init_from = _INIT_FROM.value
    distributed.initialize_distributed(config)  # Before any other JAX work.
    if jax.process_index() == 0:
      print(config.to_json_best_effort(indent=2), flush=True)
    result = stages.run(config, _WORKDIR.value, allow_config_change=_ALLOW.value)
  except KeyboardInterrupt:
    return _fail(130, "interrupted (Ctrl-C). The checkpoints saved so far are intact: the same"
                 " command resumes from the newest (SIGTERM instead saves the current step).")
  except Exception as e:  # noqa: BLE001 (each failure becomes one line and an exit code)
    distributed.exit_if_peer_failed()  # A failed peer explains it: its line and exit code 6.
    code = errors.report(e, with_traceback=_traceback_wanted(), where=_WORKDIR.value)
    if code == errors.EXIT_WRITE:  # Orbax's threads may wait on the failed write: not joined.
      sys.stdout.flush()
      os._exit(code)  # pylint: disable=protected-access
    return code
  print(f"{result['status']} at step {result['step']}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
