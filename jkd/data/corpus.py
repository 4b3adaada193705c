"""Teacher-written corpora (sequence-level KD): the teacher answers prompts, resumably.

:func:`generate_corpus` puts each prompt through the tokenizer's chat template (one user turn and
the generation prompt), samples a completion with :func:`jkd.sampling.generate` (stopping at the
end-of-turn token; what follows it is dropped) and, once every prompt is answered, writes a TFDS
dataset in the ``prompt_completion`` shape: text fields ``id``, ``prompt``, ``completion``,
``domain``, in the order of the prompts.

A long job survives being killed. Work goes to ``out_dir/<name>.partial/`` as append-only JSONL
parts (one record per prompt), flushed and fsynced after every batch; a new run skips the prompt
ids already there (a torn last line, from a kill in the middle of a write, is dropped). Batches
are formed by position in the prompt list and batch ``b`` (prompts ``[b * batch_size, ...)``)
samples with the key ``fold_in(key(seed), b * batch_size)``, so a resumed job writes exactly
what an uninterrupted one would have. A partial directory started with other options (teacher,
sampling, prompts) is refused rather than mixed.

The CLI::

  python -m jkd.data.corpus --teacher smollm2 --prompts FILE.jsonl --out DIR [--name corpus] \\
      [--max_new_tokens 128] [--batch_size 8] [--temperature 0.7] [--top_p 0.95] [--seed 0] \\
      [--limit N]

Prompt files are JSONL, one ``{"id": "w001", "prompt": "...", "domain": "writing"}`` per line
(``id`` defaults to the line number, ``domain`` to ``""``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jkd import errors
from jkd import runtime
from jkd import sampling
from jkd.data import store
from jkd.data.jsonl import read_text_lines
from jkd.data.model_spec import load_model
from jkd.data.teacher_cache import teacher_fingerprint

PyTree = Any

#: Tokens that end an assistant turn in common chat templates; stop ids when in the vocabulary.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
CORPUS_KIND = "teacher_corpus"
_OPTIONS_FILE = "options.json"
#: jkd's shipped instructions (320 prompts), the main job's default.
SHIPPED_PROMPTS = os.path.join(os.path.dirname(__file__), "prompts", "instructions.jsonl")


# -------------------------------------------------------------------------------------------------
# Prompts


def _prompt_record(raw: Any, where: str, default_id: str, keep: bool = False) -> dict[str, Any]:
  if not isinstance(raw, Mapping):
    raise ValueError(f"{where}: a prompt must be a JSON object with a 'prompt' string, got"
                     f" {type(raw).__name__}.")
  prompt = raw.get("prompt")
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}.")
  pid = raw.get("id", default_id)
  if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
    raise ValueError(f"{where}: 'id' must be a non-empty string or int, got {pid!r}.")
  domain = raw.get("domain", "")
  if not isinstance(domain, str):
    raise ValueError(f"{where}: 'domain' must be a string, got {domain!r}.")
  record = {"id": str(pid), "prompt": prompt, "domain": domain}
  return {**raw, **record} if keep else record


def _check_unique(records: Sequence[Mapping[str, str]], wheres: Sequence[str]) -> None:
  seen: dict[str, str] = {}
  for rec, where in zip(records, wheres):
    if rec["id"] in seen:
      raise ValueError(f"{where}: prompt id {rec['id']!r} repeats the id of {seen[rec['id']]};"
                       " every prompt needs its own id (resuming skips prompts by id).")
    seen[rec["id"]] = where


def read_prompts(path: str, *, keep: bool = False) -> list[dict[str, Any]]:
  """Reads a prompt file: JSONL (``.jsonl``), or plain text with one prompt a line.

  Args:
    path: a ``.jsonl`` file of one JSON object per line with ``prompt`` (required), ``id``
      (default: the line number) and ``domain`` (default ``""``); any other file, one prompt a
      line. Blank lines are skipped.
    keep: keep a JSONL record's other fields (e.g. a reference ``answer`` for a scorer, or the
      ``chosen``/``rejected`` texts of a pair file).

  Returns:
    ``[{"id": str, "prompt": str, "domain": str, ...}, ...]`` in file order.

  Raises:
    ValueError: a line that is not UTF-8 or not a JSON object with a non-empty ``prompt``, a
      repeated id, or no prompt at all (the message names the file and line).
    FileNotFoundError: no file at ``path``.

  >>> import os, tempfile
  >>> path = os.path.join(tempfile.mkdtemp(), "p.txt")
  >>> _ = open(path, "w").write("Name a colour.\\n\\nCount to three.\\n")
  >>> [r["prompt"] for r in read_prompts(path)], read_prompts(path)[1]["id"]
  (['Name a colour.', 'Count to three.'], '3')
  """
  records, wheres = [], []
  jsonl = os.fspath(path).endswith(".jsonl")
  for lineno, line in read_text_lines(path):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    if not jsonl:
      records.append({"id": str(lineno), "prompt": line.rstrip("\n"), "domain": ""})
      wheres.append(where)
      continue
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one object like"
                       ' {"id": "w001", "prompt": "...", "domain": "writing"}.') from None
    records.append(_prompt_record(raw, where, str(lineno), keep))
    wheres.append(where)
  if not records:
    raise ValueError(f"{path}: holds no prompts.")
  _check_unique(records, wheres)
  return records


def _as_records(prompts) -> list[dict[str, str]]:
  if isinstance(prompts, (str, os.PathLike)):
    return read_prompts(os.fspath(prompts))
  records = []
  for i, p in enumerate(prompts):
    raw = {"prompt": p} if isinstance(p, str) else p
    records.append(_prompt_record(raw, f"prompt {i}", str(i)))
  if not records:
    raise ValueError("prompts is empty: give at least one prompt.")
  _check_unique(records, [f"prompt {i}" for i in range(len(records))])
  return records


def encode_prompt(tokenizer, prompt: str, *, chat_template: bool = True) -> list[int]:
  """Token ids of one prompt: a user turn plus the generation prompt, or the plain text.

  Args:
    tokenizer: a ``transformers`` tokenizer (with a chat template when ``chat_template``).
    prompt: the prompt text.
    chat_template: apply ``tokenizer.apply_chat_template([user turn],
      add_generation_prompt=True)``; else tokenize the text with the tokenizer's special tokens.

  Returns:
    The prompt's ids (a list of ints).
  """
  if chat_template:
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("the tokenizer has no chat template; pass chat_template=False (CLI:"
                       " --no_chat_template / --no-chat-template) to tokenize prompts as plain"
                       " text.")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
  else:
    ids = tokenizer(prompt, add_special_tokens=True)
  if isinstance(ids, Mapping) or hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return [int(i) for i in ids]


def default_stop_ids(tokenizer) -> list[int]:
  """The tokenizer's EOS id plus any :data:`END_OF_TURN_TOKENS` it has."""
  stops = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
  vocab = tokenizer.get_vocab()
  stops |= {int(vocab[t]) for t in END_OF_TURN_TOKENS if t in vocab}
  if not stops:
    raise ValueError("the tokenizer has no EOS token: pass stop_ids explicitly.")
  return sorted(stops)


def completion_records(tokens: np.ndarray, lengths: np.ndarray, stop_ids: Iterable[int],
                       tokenizer) -> list[dict[str, Any]]:
  """Decoded completions of a sampled batch.

  Args:
    tokens: ``[B, N]`` new tokens; lengths: ``[B]`` tokens per row, the stop token included.
    stop_ids: the ids that end a completion.
    tokenizer: decodes with ``skip_special_tokens=True``.

  Returns:
    One ``{"completion": str, "n_tokens": int, "finish_reason": "stop" | "length"}`` per row;
    ``n_tokens`` counts the completion's tokens without the stop token.
  """
  stops = {int(s) for s in stop_ids}
  out = []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    row = row[:int(n)]
    stopped = row.size > 0 and int(row[-1]) in stops
    body = row[:-1] if stopped else row
    out.append({"completion": tokenizer.decode(body.tolist(), skip_special_tokens=True),
                "n_tokens": int(body.size), "finish_reason": "stop" if stopped else "length"})
  return out


# -------------------------------------------------------------------------------------------------
# The partial directory


def _read_part(path: str) -> list[dict[str, Any]]:
  """Records of one part file; a torn or unparsable last line is cut off the file."""
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  good_end, records = 0, []
  for lineno, line in enumerate(lines, start=1):
    last = lineno >= len(lines) - 1  # the final piece, or the final complete line
    if lineno == len(lines):  # after the last newline: empty, or a torn write
      break
    try:
      rec = json.loads(line)
      if not isinstance(rec, dict) or "id" not in rec or "completion" not in rec:
        raise ValueError("not a corpus record")
    except ValueError as e:
      if last:
        break
      raise ValueError(f"{path}:{lineno}: corrupt record ({e}); delete the line (or the"
                       " partial directory to start over).") from None
    records.append(rec)
    good_end += len(line) + 1
  if good_end != len(data):
    with open(path, "r+b") as f:  # drop the torn tail so that appends start on a clean line
      f.truncate(good_end)
      f.flush()
      os.fsync(f.fileno())
  return records


def _read_partial(partial: str) -> dict[str, dict[str, Any]]:
  done: dict[str, dict[str, Any]] = {}
  for name in sorted(os.listdir(partial)):
    if name.startswith("part-") and name.endswith(".jsonl"):
      for rec in _read_part(os.path.join(partial, name)):
        done.setdefault(str(rec["id"]), rec)
  return done


def _check_options(partial: str, options: Mapping[str, Any]) -> None:
  path = os.path.join(partial, _OPTIONS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diff = sorted(k for k in set(saved) | set(options) if saved.get(k) != options.get(k))
    if diff:
      detail = ", ".join(f"{k}: {saved.get(k)!r} then, {options.get(k)!r} now" for k in diff)
      raise ValueError(f"{partial} was started with other options ({detail}); rerun with the"
                       " same teacher, prompts and sampling options to resume, or delete that"
                       " directory to start over.")
    return
  with open(path + ".tmp", "w") as f:
    json.dump(options, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def _next_part(partial: str) -> str:
  n = sum(1 for name in os.listdir(partial) if name.startswith("part-"))
  return os.path.join(partial, f"part-{n:05d}.jsonl")


# -------------------------------------------------------------------------------------------------
# generate_corpus


def _check_positive(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_corpus_options(max_new_tokens, batch_size, temperature, top_p) -> None:
  """Raises ``ValueError`` for sampling options out of range (before any prompt work)."""
  _check_positive("max_new_tokens", max_new_tokens)
  _check_positive("batch_size", batch_size)
  sampling.check_filters(top_p=top_p)
  if not isinstance(temperature, (int, float)) or not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")


def _resume(partial: str, options: Mapping[str, Any],
            records: Sequence[Mapping[str, str]]) -> dict[str, dict[str, Any]]:
  """Creates or checks the partial directory; returns the records already written, by id."""
  os.makedirs(partial, exist_ok=True)
  _check_options(partial, options)
  done = _read_partial(partial)
  unknown = sorted(set(done) - {r["id"] for r in records})
  if unknown:
    raise ValueError(f"{partial} holds records for prompt ids {unknown[:5]} that are not among"
                     " the prompts; delete that directory to start over.")
  return done


def _answer_batch(batch: Sequence[Mapping[str, str]], start: int, done: dict[str, dict[str, Any]],
                  *, params: PyTree, config, tokenizer, key: jax.Array, chat_template: bool,
                  max_new_tokens: int, temperature: float, top_p: float,
                  stops: Sequence[int]) -> list[dict[str, Any]]:
  """Samples the batch starting at prompt ``start`` with ``fold_in(key, start)``; adds the
  records of its prompts not yet in ``done`` to ``done`` and returns them."""
  rows = [encode_prompt(tokenizer, r["prompt"], chat_template=chat_template) for r in batch]
  out = sampling.generate(params, rows, config=config, key=jax.random.fold_in(key, start),
                          max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, stop_ids=stops)
  new = []
  for i, (rec, comp) in enumerate(zip(batch, completion_records(
      out.tokens, out.lengths, stops, tokenizer))):
    if rec["id"] not in done:
      done[rec["id"]] = dict(rec, index=start + i, **comp)
      new.append(done[rec["id"]])
  return new


def _answer_prompts(records: Sequence[Mapping[str, str]], done: dict[str, dict[str, Any]],
                    partial: str, *, params: PyTree, config, tokenizer, seed: int,
                    batch_size: int, max_new_tokens: int, temperature: float, top_p: float,
                    chat_template: bool, stops: Sequence[int], name: str,
                    progress: bool, should_stop: Callable[[], bool] | None = None) -> bool:
  """Answers the batches holding prompts not in ``done``, adding their records to ``done`` and
  appending them to a new part file (flushed and fsynced after every batch); returns False
  when ``should_stop()`` said so before a batch (the batches written are kept)."""
  bar = tqdm(total=len(records), initial=len(done), desc=f"corpus {name}", unit="prompt",
             disable=not progress)
  key = jax.random.key(seed)
  part = None
  try:
    for start in range(0, len(records), batch_size):
      batch = records[start:start + batch_size]
      if all(r["id"] in done for r in batch):
        continue
      if should_stop is not None and should_stop():
        return False
      new = _answer_batch(batch, start, done, params=params, config=config, tokenizer=tokenizer,
                          key=key, chat_template=chat_template, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, stops=stops)
      if part is None:
        part = open(_next_part(partial), "a", encoding="utf-8")
      part.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
      part.flush()
      os.fsync(part.fileno())
      bar.update(len(new))
  finally:
    bar.close()
    if part is not None:
      part.close()
  return True


def _write_corpus(out_dir: str, name: str, partial: str, ordered: Sequence[Mapping[str, Any]], *,
                  teacher: str, options: Mapping[str, Any],
                  metadata: Mapping[str, Any] | None) -> str:
  """Writes the answered prompts as the TFDS dataset, then removes the partial directory."""
  finish = {"stop": 0, "length": 0}
  for r in ordered:
    finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
  features = {f: store.text_feature() for f in ("id", "prompt", "completion", "domain")}
  meta = {"kind": CORPUS_KIND, "shape": "prompt_completion", "teacher": teacher,
          "teacher_fingerprint": options["teacher_fingerprint"], "sampling": options["sampling"],
          "seed": options["seed"], "count": len(ordered), "finish_reasons": finish,
          "completion_tokens": sum(r["n_tokens"] for r in ordered), **dict(metadata or {})}
  path = store.write_dataset(
      out_dir, name, features,
      {"train": ({f: r[f] for f in features} for r in ordered)},
      description=f"completions written by {teacher or 'a teacher'}", metadata=meta)
  shutil.rmtree(partial)
  return path


def generate_corpus(prompts, out_dir: str, *, params: PyTree, config, tokenizer,
                    max_new_tokens: int = 128, batch_size: int = 8, temperature: float = 0.7,
                    top_p: float = 0.95, seed: int = 0, chat_template: bool = True,
                    name: str = "corpus", progress: bool = True, teacher: str = "",
                    stop_ids: Sequence[int] | None = None,
                    metadata: Mapping[str, Any] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> str | None:
  """Has the teacher answer every prompt and writes the corpus as a TFDS dataset (resumable).

  Args:
    prompts: a JSONL path (:func:`read_prompts`), or a list of prompt strings or of
      ``{"prompt", "id", "domain"}`` dicts.
    out_dir: the TFDS root; the dataset goes to ``out_dir/name/1.0.0`` and the work in progress
      to ``out_dir/name.partial/``.
    params, config, tokenizer: the teacher.
    max_new_tokens: most tokens per completion.
    batch_size: prompts per :func:`jkd.sampling.generate` call.
    temperature, top_p: sampling options.
    seed: batch ``b`` samples with ``fold_in(key(seed), b * batch_size)``.
    chat_template: wrap prompts in the tokenizer's chat template (else plain text).
    name: dataset name.
    progress: a tqdm bar over prompts.
    teacher: a description of the teacher for the metadata (e.g. its spec).
    stop_ids: ids ending a completion (default :func:`default_stop_ids`).
    metadata: more facts to store with the dataset.
    should_stop: polled before each batch; when it returns True the work so far stays in the
      partial directory (a later call goes on from it) and None is returned.

  Returns:
    The dataset directory (None when stopped). Fields: ``id``, ``prompt``, ``completion``, ``domain`` (text);
    metadata: ``kind`` (``"teacher_corpus"``), ``shape`` (``"prompt_completion"``),
    ``teacher``, ``teacher_fingerprint``, ``sampling``, ``seed``, ``count``,
    ``finish_reasons``, ``completion_tokens``.

  Raises:
    FileExistsError: the dataset exists already (and no partial directory is left to finish).
    ValueError: bad prompts or options, or a partial directory started with other options.
  """
  _check_corpus_options(max_new_tokens, batch_size, temperature, top_p)
  records = _as_records(prompts)
  stops = default_stop_ids(tokenizer) if stop_ids is None else sorted({int(s) for s in stop_ids})
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  final = os.path.join(out_dir, name, "1.0.0")
  partial = os.path.join(out_dir, f"{name}.partial")
  if os.path.exists(os.path.join(final, "dataset_info.json")):
    if os.path.isdir(partial):  # killed after the (atomic) dataset write, before the cleanup
      shutil.rmtree(partial)
      return final
    raise FileExistsError(f"a corpus already exists at {final}; choose another --name or --out,"
                          " or delete it yourself.")

  sampling_opts = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                   "top_p": float(top_p), "batch_size": int(batch_size),
                   "chat_template": bool(chat_template), "stop_ids": stops}
  prompts_digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:32]
  options = {"teacher_fingerprint": teacher_fingerprint(params, config), "seed": int(seed),
             "sampling": sampling_opts, "prompts_digest": prompts_digest}
  done = _resume(partial, options, records)
  if not _answer_prompts(records, done, partial, params=params, config=config,
                         tokenizer=tokenizer, seed=seed, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         chat_template=chat_template, stops=stops, name=name,
                         progress=progress, should_stop=should_stop):
    return None
  return _write_corpus(out_dir, name, partial, [done[r["id"]] for r in records],
                       teacher=teacher, options=options, metadata=metadata)


# -------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> str:
  """``python -m jkd.data.corpus``: see the module docstring and ``--help``."""
  p = argparse.ArgumentParser(prog="python -m jkd.data.corpus",
                              description="Have a teacher write completions for prompts.")
  p.add_argument("--teacher", required=True,
                 help="smollm2 | gguf:PATH | hf:DIR | random:{json ModelConfig fields}")
  p.add_argument("--prompts", default=None,
                 help="JSONL prompt file (default: jkd/data/prompts/instructions.jsonl)")
  p.add_argument("--out", required=True, help="TFDS root the corpus is written under")
  p.add_argument("--name", default="corpus")
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--temperature", type=float, default=0.7)
  p.add_argument("--top_p", type=float, default=0.95)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
  p.add_argument("--no_chat_template", action="store_true", help="feed the prompt text as is")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)
  prompts_path = args.prompts or SHIPPED_PROMPTS
  if not os.path.exists(prompts_path):
    p.error(f"no prompt file at {prompts_path}; pass --prompts FILE.jsonl.")
  prompts = read_prompts(prompts_path)
  if args.limit is not None:
    prompts = prompts[:args.limit]
  teacher = load_model(args.teacher)
  path = generate_corpus(prompts, args.out, params=teacher.params, config=teacher.config,
                         tokenizer=teacher.tokenizer, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed,
                         chat_template=not args.no_chat_template, name=args.name,
                         progress=not args.no_progress, teacher=args.teacher,
                         metadata={"prompts_file": os.path.abspath(prompts_path)})
  meta = store.read_metadata(path)
  print(f"wrote {meta['count']} completions ({meta['completion_tokens']} tokens,"
        f" finish {meta['finish_reasons']}) to {path}")
  return path


if __name__ == "__main__":
  runtime.prepare_process()
  errors.run_main(main)
