"""Procedural shapes drawn on the fly: a data set with no files, for tests and benchmarks.

Sample ``i`` is a function of (seed, split, i) alone, so it is the same in every worker,
rank and run, and the train and val splits never share a sample.
"""

from __future__ import annotations

from .batch import Tokenizer
from .mapstyle import make_map_data
from .samples import Preprocess, Sample
from .seeding import make_rng
from .shapes import draw_sample
from .spec import DataInfo, DataSpec

DEFAULT_NUM_SAMPLES = 10_000
IMAGE_SIZE = 64  # drawn at the demo data's size; ``preprocess`` resizes


class SyntheticSource:
    """``size`` shapes with captions and labels (see ``shapes.draw_sample``)."""

    def __init__(self, size: int, seed: int, split: str, preprocess: Preprocess):
        self.size, self.seed, self.split, self.preprocess = size, seed, split, preprocess
        self.name = f"synthetic {split} data"

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Sample:
        image, caption, label = draw_sample(make_rng(self.seed, self.split, index), IMAGE_SIZE)
        return Sample(self.preprocess(image), caption, label)


def make_synthetic_data(spec: DataSpec, preprocess: Preprocess, tokenizer: Tokenizer) -> DataInfo:
    """Batches of shapes; ``spec.paths`` is ignored, ``num_samples`` defaults to 10,000."""
    size = spec.num_samples or DEFAULT_NUM_SAMPLES
    source = SyntheticSource(size, spec.seed, "train" if spec.is_train else "val", preprocess)
    return make_map_data(source, spec, tokenizer)
