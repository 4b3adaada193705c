"""``python -m jkd.export --workdir RUN --out DIR``: a run's trained student as a Hugging Face
directory.

Reads the newest checkpoint under ``RUN`` (a workdir, its ``checkpoints`` folder or one step
directory; read only, the checkpoint is never changed), restores the student's parameters as
``student.init_from`` does, and writes ``DIR`` with :func:`jkd.models.save_hf`: ``config.json``,
``model.safetensors``, the run's tokenizer (the teacher's, which the student shares; none for a
random teacher without one) and ``jkd_export.json`` (where it came from). A run with a
``dual_head`` term (docs/methods.md §14) chooses what becomes of its auxiliary head::

  python -m jkd.export --workdir /tmp/jkd_dual_head --out /tmp/export               # drop
  python -m jkd.export --workdir /tmp/jkd_dual_head --out /tmp/export \\
      --dual_head merge --alpha 0.5 --beta 1.0

``drop`` (the default) exports the main head alone; ``merge`` one linear head
``alpha W + (1 - alpha) A / beta`` (untied from the embedding; see
:func:`jkd.losses.dual_head.export_params`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax

from jkd import losses
from jkd import models
from jkd.errors import RunError
from jkd.losses import dual_head as dual_head_lib

PyTree = Any

#: The file written next to the model, recording its source.
MANIFEST = "jkd_export.json"


def _restore_term_params(step_dir: str, sharding) -> dict:
  """The train state's ``term_params`` (shapes from the checkpoint's own metadata)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from jkd.train import checkpoint as ckpt_lib  # noqa: PLC0415

  state_dir = os.path.join(step_dir, "state")
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(state_dir).item_metadata
      stored = metadata.get("term_params") if hasattr(metadata, "get") else None
      if not stored:
        return {}
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                              dict(stored), is_leaf=lambda m: hasattr(m, "shape"))
      item = {"term_params": abstract}
      restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except Exception as e:  # noqa: BLE001
    raise ckpt_lib.CheckpointError(f"checkpoint {step_dir}: its term_params cannot be read"
                                   f" ({type(e).__name__}: {e}).") from e
  return restored["term_params"]


def restore_student(workdir: str) -> dict[str, Any]:
  """The student of the newest checkpoint under ``workdir``, read only.

  Returns:
    ``{"step_dir", "step", "run_config" (the run's config dict), "config" (ModelConfig),
    "params", "term_params"}``.

  Raises:
    FileNotFoundError: no checkpoint under ``workdir``.
    ValueError: the checkpoint does not record its student model, or its shapes differ.
  """
  from jkd.train import build  # noqa: PLC0415
  from jkd.train import checkpoint as ckpt_lib  # noqa: PLC0415

  step_dir = ckpt_lib.find_checkpoint(os.path.expanduser(workdir))
  stored = ckpt_lib.read_config(step_dir)
  if not stored.get("student_model"):
    raise ValueError(f"the checkpoint {step_dir} does not record its student model.")
  config = models.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in stored["student_model"].items()})
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          build.abstract_params(config)[0])
  params = ckpt_lib.restore_params(step_dir, abstract)
  return {"step_dir": step_dir, "step": int(os.path.basename(step_dir.rstrip("/"))),
          "run_config": stored.get("config") or {}, "config": config, "params": params,
          "term_params": _restore_term_params(step_dir, sharding)}


def _dual_head_terms(run_config: dict) -> list[str]:
  objective = run_config.get("objective") or {}
  return [name for name, entry in objective.items()
          if isinstance(entry, dict) and entry.get("term", name) == "dual_head"]


def _tokenizer(run_config: dict):
  """The run's tokenizer, or ``(None, why)``."""
  import ml_collections  # noqa: PLC0415
  from jkd.train import build  # noqa: PLC0415

  cfg = ml_collections.ConfigDict(run_config)
  if set(_objective_terms(run_config)) & build.CROSS_TOKENIZER_TERMS:
    return None, "a cross-tokenizer run: the teacher's tokenizer is not the student's"
  if cfg.teacher.source == "random" and not cfg.teacher.get("tokenizer"):
    return None, "the run's random teacher has no tokenizer"
  return build.tokenizer_for(cfg), ""


def _objective_terms(run_config: dict) -> list[str]:
  objective = run_config.get("objective") or {}
  return [entry.get("term", name) if isinstance(entry, dict) else name
          for name, entry in objective.items()]


def export(workdir: str, out: str, *, dual_head: str = "drop", alpha: float = 0.5,
           beta: float = 1.0, tokenizer: bool = True) -> dict[str, Any]:
  """Writes the student of ``workdir``'s newest checkpoint to ``out`` (see the module doc).

  Args:
    workdir: a jkd workdir, its ``checkpoints`` folder, or one step directory.
    out: the output directory (or a ``gs://`` URL); not inside the checkpoints.
    dual_head: ``"drop"`` or ``"merge"`` (:func:`jkd.losses.dual_head.export_params`).
    alpha, beta: the merge's weight in ``[0, 1]`` and aux temperature ``> 0``.
    tokenizer: also save the run's tokenizer (when it has one).

  Returns:
    The manifest, also written to ``out/jkd_export.json`` (for a local ``out``).

  Raises:
    ValueError: a bad mode, ``alpha`` or ``beta``; ``merge`` for a run without a ``dual_head``
      term; ``out`` inside the checkpoints.
    FileNotFoundError: no checkpoint under ``workdir``.
  """
  dual_head_lib.check_export(dual_head, alpha, beta)
  restored = restore_student(workdir)
  ckpt_root = os.path.realpath(os.path.dirname(restored["step_dir"].rstrip("/")))
  local_out = "://" not in str(out)
  if local_out and ((os.path.realpath(out) + os.sep).startswith(ckpt_root + os.sep)
                    or os.path.realpath(out) == os.path.dirname(ckpt_root)):
    raise ValueError(f"--out {out} is the run's workdir or lies inside its checkpoints"
                     f" {ckpt_root}: export to a folder of its own (the run's files are never"
                     " modified).")
  terms = _dual_head_terms(restored["run_config"])
  term_params = {k: v for k, v in restored["term_params"].items() if k in terms}
  if dual_head == "merge" and not term_params:
    raise ValueError(f"--dual_head merge: the run at {restored['step_dir']} has no dual_head"
                     " term (its objective terms:"
                     f" {_objective_terms(restored['run_config'])}); export with --dual_head"
                     " drop.")
  if dual_head == "merge" and len(term_params) > 1:
    raise ValueError(f"the run has several dual_head terms {sorted(term_params)}; jkd.export"
                     " merges one.")
  params, config = losses.export_params(restored["params"], term_params, restored["config"],
                                        mode=dual_head, alpha=alpha, beta=beta)
  tok, why = _tokenizer(restored["run_config"]) if tokenizer else (None, "--no-tokenizer")
  models.save_hf(out, params, config, tokenizer=tok)
  manifest = {"workdir": os.path.abspath(os.path.expanduser(workdir)),
              "checkpoint": restored["step_dir"], "step": restored["step"],
              "dual_head": ({"mode": dual_head, "alpha": alpha, "beta": beta,
                             "terms": sorted(term_params)} if term_params else None),
              "tokenizer": why or "saved"}
  if not local_out:
    return manifest
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """``python -m jkd.export`` (see ``--help``)."""
  import argparse  # noqa: PLC0415
  import sys  # noqa: PLC0415

  p = argparse.ArgumentParser(
      prog="python -m jkd.export",
      description="Export the student of a jkd run's newest checkpoint as a Hugging Face"
      " directory (read only: the checkpoint is not changed).")
  p.add_argument("--workdir", required=True,
                 help="the run's workdir, its checkpoints/ folder, or one step directory")
  p.add_argument("--out", required=True, help="the output directory (or gs:// URL)")
  p.add_argument("--dual_head", default="drop",
                 help="a dual_head run's aux head: drop (main head only, default) or merge"
                 " (one head alpha*W + (1-alpha)*A/beta)")
  p.add_argument("--alpha", type=float, default=0.5,
                 help="merge: weight of the main head, in [0, 1] (default 0.5)")
  p.add_argument("--beta", type=float, default=1.0,
                 help="merge: temperature of the aux head's logits, > 0 (default 1.0)")
  p.add_argument("--tokenizer", action=argparse.BooleanOptionalAction, default=True,
                 help="save the run's tokenizer too (default: yes)")
  args = p.parse_args(argv)
  try:
    manifest = export(args.workdir, args.out, dual_head=args.dual_head, alpha=args.alpha,
                      beta=args.beta, tokenizer=args.tokenizer)
  except (ValueError, TypeError, FileNotFoundError, RunError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  head = manifest["dual_head"]
  print(f"exported step {manifest['step']} of {manifest['workdir']} to {args.out}"
        + (f" (dual head: {head['mode']}"
           + (f", alpha={head['alpha']}, beta={head['beta']})" if head["mode"] == "merge"
              else ")") if head else "")
        + ("" if manifest["tokenizer"] == "saved" else f"; no tokenizer: {manifest['tokenizer']}"))
  return manifest


if __name__ == "__main__":
  main()
