"""Workdir paths that are local directories or object-storage URLs (``gs://bucket/run``).

A run's workdir may be a local (or mounted) path or a ``gs://`` URL. Orbax and tensorstore
write the checkpoints to either; the few small files the engine writes itself
(``config.json``, ``metrics.jsonl``, ``config_history.jsonl``, the report) go through
``etils.epath``, which reads and writes ``gs://`` with ``gcsfs``. Object stores have no append
and no rename: :func:`append_text` rewrites the object, :func:`write_text` writes it whole
(atomic on GCS; through a temporary file and ``os.replace`` locally).

Testing against an emulator: ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore) name its endpoint.
"""

from __future__ import annotations

import os
import re

#: ``scheme://`` of a URL (``gs://``, ``s3://``, ...), as opposed to a local path.
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str) -> bool:
  """True for a URL such as ``gs://bucket/run`` (object storage), False for a local path."""
  return bool(_URL.match(str(path)))


def resolve(path: str) -> str:
  """A local path made absolute (``~`` expanded); a URL without its trailing slashes."""
  path = str(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  """``base/part/...`` for a local path or a URL."""
  if is_remote(base):
    return "/".join([str(base).rstrip("/"), *parts])
  return os.path.join(base, *parts)


def _path(path: str):
  from etils import epath  # noqa: PLC0415 (gcsfs loads only for a URL)
  return epath.Path(path)


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else _path(path).exists()


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_remote(path) else _path(path).is_dir()


def makedirs(path: str) -> None:
  """Makes a local directory (and its parents); nothing for a URL (objects need no folders)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in a directory (``[]`` when it does not exist)."""
  if not is_remote(path):
    return os.listdir(path) if os.path.isdir(path) else []
  p = _path(path)
  return [child.name for child in p.iterdir()] if p.exists() else []


def rmtree(path: str) -> None:
  """Removes a directory tree, ignoring errors (what is left is reported by the caller)."""
  if not is_remote(path):
    import shutil  # noqa: PLC0415
    shutil.rmtree(path, ignore_errors=True)
    return
  try:
    _path(path).rmtree()
  except Exception:  # noqa: BLE001 (best effort, as shutil's ignore_errors)
    pass


def read_text(path: str) -> str | None:
  """The file's text, or None when it does not exist."""
  if not is_remote(path):
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      return f.read()
  p = _path(path)
  return p.read_text() if p.exists() else None


def write_text(path: str, text: str) -> None:
  """Writes the whole file: through a temporary file and ``os.replace`` locally (a reader never
  sees half of it), as one object upload for a URL."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole binary file (as :func:`write_text`)."""
  if is_remote(path):
    _path(path).write_bytes(data)
    return
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def append_text(path: str, text: str) -> None:
  """Appends to a file; an object is read and written again (object stores cannot append)."""
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  write_text(path, (read_text(path) or "") + text)


#: Seconds to wait for object storage to answer the first request (``JKD_STORAGE_TIMEOUT_S``).
DEFAULT_TIMEOUT_S = 60.0


def _bounded(fn, path: str, timeout_s: float):
  """``fn()`` in a thread, given at most ``timeout_s``: a store that does not answer is an
  error naming it, not a hang (the thread is left behind; it is a daemon)."""
  import threading  # noqa: PLC0415

  result: dict = {}

  def target():
    try:
      result["value"] = fn()
    except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
      result["error"] = e

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST", "storage.googleapis.com")
    raise TimeoutError(f"{path}: object storage ({endpoint}) did not answer within"
                       f" {timeout_s:.0f} s: check the network, the endpoint and the"
                       " credentials (JKD_STORAGE_TIMEOUT_S sets the wait).")
  if "error" in result:
    raise result["error"]
  return result.get("value")


def check_workdir(path: str) -> None:
  """For a URL (a workdir, a dataset): the store answers (within ``JKD_STORAGE_TIMEOUT_S``) and the bucket
  exists. Reads only; nothing is written. Local paths are not checked here.

  Raises:
    ValueError: no such bucket, or no access to it.
    TimeoutError: the store did not answer.
  """
  if not is_remote(path):
    return
  bucket = _bucket_of(path)
  timeout_s = float(os.environ.get("JKD_STORAGE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
  try:
    found = _bounded(lambda: _path(bucket).exists(), path, timeout_s)
  except TimeoutError:
    raise
  except OSError as e:
    raise ValueError(f"{path}: cannot read the bucket {bucket} ({type(e).__name__}: {e}); check"
                     " the credentials (gcloud auth application-default login, or a service"
                     " account with access to it).") from e
  if not found:
    raise ValueError(f"{path}: the bucket {bucket} does not exist (or is not visible to these"
                     f" credentials): create it (gcloud storage buckets create {bucket}) or fix"
                     " the path.")


def probe_write(path: str) -> None:
  """Writes and removes a small object (a file) under ``path``: permission and reachability
  errors surface before anything is saved, within ``JKD_STORAGE_TIMEOUT_S`` for a URL."""
  target = join(path, ".jkd-write-probe")
  if not is_remote(path):
    makedirs(path)
    write_text(target, "")
    os.remove(target)
    return
  timeout_s = float(os.environ.get("JKD_STORAGE_TIMEOUT_S", DEFAULT_TIMEOUT_S))
  _bounded(lambda: (_path(target).write_text(""), _path(target).unlink()), path, timeout_s)


def _bucket_of(path: str) -> str:
  scheme, rest = str(path).split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def localize(path: str, cache_dir: str) -> str:
  """A local path for ``path``: a local path as it is; a ``gs://`` file or directory copied once
  under ``cache_dir/remote/<scheme>/<bucket>/<path>`` (a ``.complete`` marker records a whole
  copy; an interrupted one is copied again). Datasets, teacher caches and model directories in
  object storage are read this way: their readers (ArrayRecord, safetensors, GGUF) take local
  files.

  Raises:
    ValueError: no such bucket or object; TimeoutError: the store did not answer.
  """
  if not is_remote(path):
    return path
  path = resolve(path)
  check_workdir(path)  # The bucket exists and answers (bounded).
  scheme, rest = path.split("://", 1)
  target = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "remote", scheme, rest)
  marker = target + ".complete"
  if os.path.exists(marker):
    return target
  source = _path(path)
  if source.is_dir():
    files, folders = [], [source]
    while folders:  # (GCS refuses recursive patterns: the folders are listed one by one.)
      for child in folders.pop().iterdir():
        (folders if child.is_dir() else files).append(child)
    prefix = str(source).rstrip("/") + "/"
    pairs = [(f, os.path.join(target, str(f)[len(prefix):])) for f in files]
  elif source.exists():
    pairs = [(source, target)]
  else:
    raise ValueError(f"{path}: no such object or folder in {_bucket_of(path)}.")
  import shutil  # noqa: PLC0415
  for src, dst in pairs:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with src.open("rb") as fin, open(dst + ".part", "wb") as fout:
      shutil.copyfileobj(fin, fout, 16 << 20)
    os.replace(dst + ".part", dst)
  with open(marker, "w", encoding="utf-8") as f:
    f.write(path + "\n")
  return target


def upload(local_dir: str, url: str) -> None:
  """Copies every file of ``local_dir`` to the ``url`` folder (e.g. an export to ``gs://``)."""
  import shutil  # noqa: PLC0415
  for root, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      with open(os.path.join(root, name), "rb") as fin, \
          _path(join(url, *rel.split(os.sep))).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
