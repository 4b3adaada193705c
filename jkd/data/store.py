"""jkd datasets on disk: TFDS datasets in ArrayRecord files, written and read without TensorFlow.

Every dataset jkd writes (JSONL imports, teacher-written corpora, offline teacher caches,
preference pairs) is a TFDS dataset directory (``<root>/<name>/<version>/``) of
``array_record`` shards plus ``dataset_info.json``/``features.json``, so that
``tfds.data_source`` / :func:`open_split` read it with random access (what Grain needs), and any
TFDS tool understands it.

>>> import tempfile, numpy as np
>>> feats = {"tokens": tensor_feature(np.int32), "text": text_feature()}
>>> root = tempfile.mkdtemp()
>>> path = write_dataset(root, "toy", feats, {"train": ({"tokens": np.arange(i + 1,
...     dtype=np.int32), "text": f"doc {i}"} for i in range(3))})
>>> src = open_split(path, "train"); len(src), src[2]["tokens"].tolist(), src[1]["text"]
(3, [0, 1, 2], b'doc 1')
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np

Example = Mapping[str, Any]


def _tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415  (slow import; only where needed)
  return tfds


def tensor_feature(dtype, shape=(None,)):
  """A TFDS ``Tensor`` feature (default: a 1-D array of any length)."""
  return _tfds().features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))


def text_feature():
  """A TFDS ``Text`` feature (read back as ``bytes``)."""
  return _tfds().features.Text()


def scalar_feature(dtype):
  """A TFDS scalar feature."""
  return _tfds().features.Scalar(dtype=np.dtype(dtype))


def _builder_class(name: str):
  tfds = _tfds()

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset from in-memory example iterators (one per split)."""
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, features, splits, description, metadata, **kwargs):
      self._features, self._splits = features, splits
      self._description, self._metadata = description, metadata
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self._description,
          features=tfds.features.FeaturesDict(dict(self._features)),
          metadata=tfds.core.MetadataDict(self._metadata or {}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(examples)
              for split, examples in self._splits.items()}

    def _generate_examples(self, examples):
      for i, ex in enumerate(examples):
        yield i, dict(ex)

  _Builder.name = name
  return _Builder


def write_dataset(root: str, name: str, features: Mapping[str, Any],
                  splits: Mapping[str, Iterable[Example]], *, description: str = "",
                  metadata: Mapping[str, Any] | None = None, num_shards: int = 1) -> str:
  """Writes ``splits`` (``{split: iterable of example dicts}``) as the TFDS dataset ``name``.

  Examples keep their order (shuffling is the reader's job, with a seed). The write is atomic:
  TFDS builds in an ``incomplete.*`` directory and renames it at the end, so a killed write
  leaves no half dataset under the final path.

  Args:
    root: the TFDS ``data_dir``.
    name: dataset name (a lower-case identifier).
    features: ``{field: feature}`` (:func:`tensor_feature`, :func:`text_feature`, ...).
    splits: ``{"train": examples, ...}``; each example a dict with every field.
    description: free text stored in ``dataset_info.json``.
    metadata: JSON-serialisable facts stored with the dataset (read by :func:`read_metadata`).
    num_shards: ArrayRecord files per split.

  Returns:
    The dataset directory (``root/name/1.0.0``).

  Raises:
    FileExistsError: the dataset already exists (datasets are never overwritten).
  """
  tfds = _tfds()
  root = os.path.abspath(os.path.expanduser(root))
  builder = _builder_class(name)(features=features, splits=splits, description=description,
                                 metadata=dict(metadata or {}), data_dir=root,
                                 file_format="array_record")
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    raise FileExistsError(f"a dataset already exists at {builder.data_dir}; choose another name"
                          " or root, or delete it yourself.")
  from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415
  was_active = tqdm_utils._active  # noqa: SLF001  (TFDS has a setter but no getter)
  tqdm_utils.display_progress_bar(False)  # Its per-split bars; callers show their own.
  try:
    with tempfile.TemporaryDirectory() as downloads, \
        contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing".
      builder.download_and_prepare(download_dir=downloads,
                                   download_config=tfds.download.DownloadConfig(
                                       num_shards=int(num_shards)))
  finally:
    tqdm_utils.display_progress_bar(was_active)
  return builder.data_dir


def find_dataset(path: str) -> str:
  """``path`` or, for a ``root/name`` directory, its newest version directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    return path
  if os.path.isdir(path):
    versions = sorted(d for d in os.listdir(path)
                      if os.path.exists(os.path.join(path, d, "dataset_info.json")))
    if versions:
      return os.path.join(path, versions[-1])
  raise FileNotFoundError(f"no TFDS dataset at {path!r} (expected dataset_info.json there or in"
                          " a version subdirectory); build it first.")


def _builder(path: str):
  """The TFDS builder of a dataset directory; an unreadable one is a ValueError naming it."""
  path = find_dataset(path)
  try:
    builder = _tfds().builder_from_directory(path)
    builder.info.metadata  # noqa: B018  (reads metadata.json)
  except Exception as e:  # noqa: BLE001  (TFDS raises protobuf, JSON and OS errors)
    raise ValueError(f"{path}: not a readable TFDS dataset ({type(e).__name__}: {e}); its"
                     " dataset_info.json or metadata.json is damaged: build the dataset again"
                     " (delete the directory first).") from e
  return path, builder


def open_split(path: str, split: str):
  """A random-access source (``len``, ``[i]`` -> dict of numpy values) of one split."""
  path, builder = _builder(path)
  if split not in builder.info.splits:
    raise ValueError(f"dataset {path!r} has no split {split!r}; it has"
                     f" {sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split)


def read_metadata(path: str) -> dict[str, Any]:
  """The ``metadata`` given to :func:`write_dataset`."""
  return dict(_builder(path)[1].info.metadata or {})
