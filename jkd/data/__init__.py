"""jkd.data: datasets on disk (TFDS ArrayRecord), pipelines, teacher-written corpora and caches."""

from jkd.data.store import (
    open_split,
    read_metadata,
    scalar_feature,
    tensor_feature,
    text_feature,
    write_dataset,
)
