"""Data: webdataset shards, CSV files or synthetic shapes -> batches of (images, token ids).

``make_data(spec, preprocess, tokenizer)`` is the entry point; see ``data/README.md``
for the formats and ``bigbatch demo-data`` for a small data set to start from.
"""

from .batch import Batch
from .factory import check_data, make_data
from .samples import DataError
from .spec import DataInfo, DataSpec

__all__ = ["Batch", "DataError", "check_data", "DataInfo", "DataSpec", "make_data"]
