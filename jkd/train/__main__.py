"""``python -m jkd.train --config configs/<name>.py[:arg] --workdir DIR [--init_from PATH]``.

Overrides: ``--config.optimizer.lr=3e-4``. The config is locked, so a misspelt key is an error
that names the nearest keys. The resolved config is printed and saved to ``DIR/config.json``;
a workdir with checkpoints resumes from the newest. Around training, :func:`jkd.train.stages.run`
writes a teacher corpus first (``data.source=teacher_corpus``) and a report after
(``report.enabled``). Exit status: 0 when done or preempted
(SIGTERM, after saving), 3 after too many non-finite steps, 4 for an unreadable checkpoint.
"""

from __future__ import annotations

import sys

from jkd import runtime

if __name__ == "__main__":
  runtime.prepare_process()  # Before JAX allocates or transformers is imported.

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jkd.train import checkpoint
from jkd.train import distributed
from jkd.train import loop
from jkd.train import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory (resumed if it has"
                               " checkpoints)")
_INIT_FROM = flags.DEFINE_string("init_from", None, "initialise the student from a Hugging"
                                 " Face directory or a jkd workdir/checkpoint")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO.
  config = _CONFIG.value
  if _INIT_FROM.value:
    config.student.init_from = _INIT_FROM.value
  distributed.initialize_distributed(config)  # Before any other JAX work.
  if jax.process_index() == 0:
    print(config.to_json_best_effort(indent=2), flush=True)
  try:
    result = stages.run(config, _WORKDIR.value)
  except loop.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 3
  except checkpoint.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 4
  print(f"{result['status']} at step {result['step']}", flush=True)
  return 0


if __name__ == "__main__":
  app.run(main)
