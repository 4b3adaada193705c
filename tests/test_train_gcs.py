"""``gs://`` paths against a local GCS server (tests/gcs_emulator.py, started here): a run
checkpoints to ``gs://bucket/...``, is killed with SIGKILL, resumes from there and ends with
metrics equal, bit for bit, to the uninterrupted local run of configs/kd_tiny.py; a teacher
cache read from the bucket trains as the local one; a Hugging Face teacher loads from it and an
export writes to it; a missing bucket and an endpoint that does not answer are one-line errors
within a bounded wait.

What is in the bucket is read through the server's JSON API with urllib, independently of the
code under test (etils.epath/gcsfs and tensorstore).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import pytest

from test_train_loop import ROOT, STEPS, exact, finish, reference, shared, start  # noqa: F401
from test_train_loop import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """``(endpoint URL, environment for the runs)`` of a GCS server with a bucket ``bucket``."""
  port = free_port()
  proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gcs_emulator.py"), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert "serving" in proc.stdout.readline()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    yield url, env
  finally:
    proc.kill()
    proc.wait()


def objects(url: str, prefix: str) -> list[str]:
  """Names of the objects under ``prefix`` in ``bucket``."""
  names, token = [], ""
  while True:
    query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?{query}") as r:
      page = json.load(r)
    names += [item["name"] for item in page.get("items", [])]
    token = page.get("nextPageToken", "")
    if not token:
      return names


def read_object(url: str, name: str) -> str | None:
  quoted = urllib.parse.quote(name, safe="")
  try:
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o/{quoted}?alt=media") as r:
      return r.read().decode()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def metrics(url: str, run: str) -> list[dict]:
  text = read_object(url, f"{run}/metrics.jsonl") or ""
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def saved_steps(url: str, run: str) -> tuple[list[int], list[int]]:
  """``(finished, started)`` checkpoint steps: in object storage orbax writes ``<step>/``
  directly (no rename) and marks a finished save with ``<step>/commit_success.txt``."""
  finished, started = set(), set()
  for name in objects(url, f"{run}/checkpoints/"):
    part, _, rest = name[len(f"{run}/checkpoints/"):].partition("/")
    if part.isdigit():
      started.add(int(part))
      if rest == "commit_success.txt":
        finished.add(int(part))
  return sorted(finished), sorted(started)


@pytest.mark.slow
def test_a_gs_workdir_survives_sigkill_and_resumes_exactly(shared, reference, gcs):  # noqa: F811
  url, env = gcs
  run = "sigkill"
  workdir = f"gs://bucket/{run}"
  proc = start(shared, workdir, env=env)
  wait_for(proc, lambda: any(m["step"] >= 10 for m in metrics(url, run)), "step 10",
           timeout=300)
  proc.kill()
  assert proc.wait() == -signal.SIGKILL
  done, started = saved_steps(url, run)
  assert done and max(done) < STEPS, (done, started)
  assert read_object(url, f"{run}/config.json") is not None

  code, out, err = finish(start(shared, workdir, env=env), timeout=300)
  assert code == 0, err[-3000:]
  assert f"resuming from {workdir}/checkpoints/{max(done)}" in err + out
  stored = [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in metrics(url, run)]
  assert stored == exact(reference)
  assert saved_steps(url, run)[0][-1] == STEPS


def test_a_missing_bucket_and_a_silent_endpoint_are_errors(shared, gcs, tmp_path):  # noqa: F811
  url, env = gcs
  code, _, err = finish(start(shared, "gs://no-such-bucket/run", env=env), timeout=300)
  assert code == 2, err[-3000:]
  assert "error: gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist" in err
  assert "gcloud storage buckets create gs://no-such-bucket" in err

  with socket.socket() as silent:  # Accepts connections and never answers.
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    start_time = time.monotonic()
    code, _, err = finish(start(shared, "gs://bucket/silent", env=dict(
        env, STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=endpoint,
        JKD_STORAGE_TIMEOUT_S="5")), timeout=300)
  assert code == 2, err[-3000:]
  assert f"object storage ({endpoint}) did not answer within 5 s" in err
  assert time.monotonic() - start_time < 120


def test_a_selection_reference_in_object_storage_is_refused_by_name():
  from jkd.train import setup as setup_lib
  from recipe_configs import load_config

  cfg = load_config("kd_tiny")
  cfg.data.select_reference = "gs://bucket/models/ref"
  with pytest.raises(ValueError, match=r"data.select_reference=gs://bucket/models/ref: .*"
                     r" local or mounted path"):
    setup_lib.check_config(cfg)


def upload_dir(url: str, local: str, prefix: str) -> None:
  """Every file under ``local`` to ``bucket/prefix/...`` through the server's upload API."""
  for root, _, files in os.walk(local):
    for name in files:
      path = os.path.join(root, name)
      key = prefix + "/" + os.path.relpath(path, local).replace(os.sep, "/")
      with open(path, "rb") as f:
        request = urllib.request.Request(
            f"{url}/upload/storage/v1/b/bucket/o?uploadType=media&name="
            + urllib.parse.quote(key, safe=""), data=f.read(), method="POST")
      urllib.request.urlopen(request).close()


@pytest.mark.slow
def test_a_teacher_cache_read_from_gs_trains_as_the_local_one(shared, gcs, tmp_path):  # noqa: F811
  """configs/kd_forward.py:cpu_cache from its offline teacher cache in the bucket (copied to
  data.cache_dir once) gives the metrics of the same run on the local cache, bit for bit."""
  from jkd.train import recipe_data
  from recipe_configs import load_config

  url, env = gcs
  local = recipe_data.write_cpu_teacher_cache(load_config("kd_forward", "cpu_cache"),
                                              str(tmp_path / "data"))["data.path"]
  upload_dir(url, local, "data/teacher_cache/1.0.0")
  config = os.path.join(ROOT, "configs", "kd_forward.py:cpu_cache")
  runs = {}
  for name, path in (("local", local), ("gs", "gs://bucket/data/teacher_cache/1.0.0")):
    workdir = tmp_path / name
    code, _, err = finish(start(shared, workdir, python_args=[
        "-m", "jkd.train", "--config", config, "--workdir", str(workdir),
        f"--config.data.path={path}", f"--config.data.cache_dir={tmp_path / 'cache'}"],
        env=env), timeout=300)
    assert code == 0, err[-3000:]
    runs[name] = exact(workdir)
  assert runs["gs"] == runs["local"] and len(runs["local"]) >= 3
  copied = tmp_path / "cache" / "remote" / "gs" / "bucket" / "data" / "teacher_cache" / "1.0.0"
  assert (copied / "dataset_info.json").exists()
  assert sorted(os.listdir(copied)) == sorted(os.listdir(local))


def test_hugging_face_import_from_and_export_to_gs(gcs, tmp_path, monkeypatch):
  """A Hugging Face directory in the bucket loads as the local one (teacher.source=hf:gs://...);
  save_hf to a gs:// URL writes the files save_hf writes locally, byte for byte."""
  import numpy as np

  from jkd import models
  from jkd.train import build
  from recipe_configs import load_config

  url, env = gcs
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  tiny = os.path.join(HERE, "data", "tiny_llama")
  upload_dir(url, tiny, "models/tiny_llama")
  cfg = load_config("kd_tiny")
  cfg.data.cache_dir = str(tmp_path / "cache")
  cfg.teacher.source = "hf:gs://bucket/models/tiny_llama"
  spec = build.teacher_spec(cfg)
  config, params = models.load_hf(tiny)
  assert spec.config == config.replace(dtype=cfg.teacher.dtype)
  mesh = build.sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  loaded = spec.load(build.param_shardings(spec.config, mesh, build.sharding.DEFAULT_RULES))
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  models.save_hf(str(tmp_path / "export"), params, config)
  models.save_hf("gs://bucket/export/tiny", params, config)
  for name in os.listdir(tmp_path / "export"):
    with open(tmp_path / "export" / name, "rb") as f:
      expected = f.read()
    quoted = urllib.parse.quote(f"export/tiny/{name}", safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o/{quoted}?alt=media") as r:
      assert r.read() == expected, name
