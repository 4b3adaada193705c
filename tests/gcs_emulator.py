"""A local Google Cloud Storage server for the ``gs://`` tests: ``python tests/gcs_emulator.py
PORT`` serves an in-memory bucket ``bucket`` at ``http://127.0.0.1:PORT`` until killed.

It is ``gcp-storage-emulator`` (a pure-Python stub of the GCS JSON API) with two gaps filled
that tensorstore, which orbax writes checkpoints with, relies on: downloads carry the object's
``x-goog-generation`` header (tensorstore reads the generation from it), and requests are
served from several threads (tensorstore issues them concurrently). Clients find it through
``STORAGE_EMULATOR_HOST`` (gcsfs, for ``etils.epath``) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore), with ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` as tensorstore's credentials.
"""

import http.server
import sys
import time

from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers import objects


def _patch() -> None:
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except Exception:  # noqa: BLE001 (a missing object: the handler answers 404)
      pass
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # objects.get(alt=media) calls it by name.
  emulator_server.HANDLERS = tuple(
      (pattern, {method: download_with_generation if fn is download else fn
                 for method, fn in methods.items()})
      for pattern, methods in emulator_server.HANDLERS)
  emulator_server.server.HTTPServer = http.server.ThreadingHTTPServer


def serve(port: int) -> None:
  _patch()
  emulator = emulator_server.create_server("127.0.0.1", port, in_memory=True,
                                           default_bucket="bucket")
  emulator.start()
  print(f"serving http://127.0.0.1:{port}", flush=True)
  while True:
    time.sleep(3600)


if __name__ == "__main__":
  serve(int(sys.argv[1]))
