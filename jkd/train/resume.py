"""Resuming with the config the checkpoint was saved with, or with changes the user names.

Every checkpoint stores the resolved config of its run. Before a run resumes,
:func:`check_resume` compares it with the new config, key by key (``optimizer.lr``,
``objective.kd.beta``, ...):

* keys that cannot change what past steps computed or the order of the data pass freely:
  :data:`FREE_KEYS` (logging, progress bars, checkpoint frequency and retention, the report,
  timeouts, the mesh: a checkpoint is read into any mesh), and ``eval.*`` unless the data source
  reads the evaluations (DDK's domain weights, DistiLLM's schedule);
* any other change (model, objective, optimizer and its schedule, ``train.steps``, seeds, data
  and batch shape) is refused with a :class:`~jkd.errors.ConfigChangedError` that lists
  each changed key with its old and new value, unless ``allow`` names it (the key or a section
  above it, e.g. ``optimizer``: ``--allow_config_change=optimizer.lr,train.steps`` on the
  command line).

An accepted resume that changed anything appends ``{"time", "step", "changes": {key: [old,
new]}, "allowed": [...]}`` to ``workdir/config_history.jsonl`` (:func:`record`).
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterable, Mapping

from jkd import errors
from jkd.train import storage

#: Keys (or sections) free to change on resume: they do not change the computation.
FREE_KEYS = ("train.log_every", "train.progress_bar", "train.peak_tflops_per_device",
             "train.max_nan_steps", "student.remat", "student.unroll_layers", "checkpoint",
             "report", "distributed", "mesh", "data.cache_dir", "eval")

HISTORY_FILE = "config_history.jsonl"

_MISSING = "<absent>"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"optimizer.lr": 3e-4, ...}`` from a nested config dict (lists are values).

  >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"})
  {'a.b': 1, 'a.c': [1, 2], 'd': 'x'}
  """
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def _under(key: str, names: Iterable[str]) -> str | None:
  """The entry of ``names`` that is ``key`` or a section above it."""
  return next((n for n in names if key == n or key.startswith(n + ".")), None)


def _eval_feeds_data(cfg: Mapping[str, Any]) -> bool:
  """Whether the data source reads evaluations (then ``eval.*`` changes the data)."""
  return (cfg.get("data", {}).get("source") == "domains"
          or cfg.get("onpolicy", {}).get("mode") == "distillm")


def free_keys(cfg: Mapping[str, Any]) -> tuple[str, ...]:
  """:data:`FREE_KEYS`, without ``eval`` when the data source reads the evaluations."""
  return tuple(k for k in FREE_KEYS if not (k == "eval" and _eval_feeds_data(cfg)))


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
  """``{key: (old value, new value)}`` for each flattened key that differs."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(set(a) | set(b))
          if a.get(k, _MISSING) != b.get(k, _MISSING)}


def check_allow(allow: Iterable[str], new: Mapping[str, Any]) -> tuple[str, ...]:
  """The ``allow`` entries, each checked to be a key or section of ``new``."""
  allow = tuple(a.strip() for a in allow if a.strip())
  keys = flatten(new)
  unknown = [a for a in allow if not any(k == a or k.startswith(a + ".") for k in keys)]
  if unknown:
    raise ValueError(f"--allow_config_change names {unknown}, which are not keys or sections"
                     " of the config (e.g. optimizer.lr, train.steps, optimizer).")
  return allow


def _show(value) -> str:
  return json.dumps(value) if value is not _MISSING else value


def check_resume(stored: Mapping[str, Any], new: Mapping[str, Any], *, where: str,
                 allow: Iterable[str] = ()) -> dict[str, tuple]:
  """The changes from the checkpoint's config ``stored`` to ``new`` that the resume accepts.

  Args:
    stored: the config saved with the checkpoint (a JSON dict).
    new: this run's config as a JSON dict.
    where: the checkpoint's path, for the message.
    allow: keys or sections whose changes the user accepts.

  Returns:
    ``{key: (old, new)}`` of every change (free or allowed).

  Raises:
    ConfigChangedError: a change that is neither free nor allowed.
    ValueError: an ``allow`` entry that is not a key of the config.
  """
  allow = check_allow(allow, new)
  changes = config_changes(stored, new)
  free = free_keys(new)
  refused = {k: v for k, v in changes.items() if not _under(k, free) and not _under(k, allow)}
  if refused:
    lines = [f"{k}: {_show(o)} -> {_show(n)}" for k, (o, n) in refused.items()]
    raise errors.ConfigChangedError(
        f"the config differs from the one the checkpoint at {where} was saved with, in keys"
        " that change what the run computes:\n  " + "\n  ".join(lines)
        + "\nResume with the checkpoint's config (rerun without these overrides), use a new"
        " workdir, or accept the changes with --allow_config_change="
        + ",".join(refused) + ". The checkpoint was left untouched.")
  return changes


def record(workdir: str, step: int, changes: Mapping[str, tuple],
           allow: Iterable[str]) -> None:
  """Appends an accepted resume's changes to ``workdir/config_history.jsonl``."""
  entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "step": int(step), "changes": {k: [o, n] for k, (o, n) in changes.items()},
           "allowed": sorted(set(allow))}
  storage.append_text(storage.join(workdir, HISTORY_FILE), json.dumps(entry) + "\n")
