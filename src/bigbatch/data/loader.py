"""The loader handed to the train loop: a DataLoader with a length and clean failures."""

from __future__ import annotations

from collections import Counter
from typing import Iterator

from torch.utils.data import DataLoader

from .batch import Batch
from .samples import DataError


class Loader:
    """Iterate a DataLoader of ``Batch``es; ``len()`` is the number of batches per epoch."""

    def __init__(self, dataloader: DataLoader, num_batches: int | None, name: str):
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.name = name  # how the user named the data, e.g. "--train-data 'x/{0..3}.tar'"

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError(f"the number of batches of {self.name} is unknown")
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        count, carried = 0, Counter()
        try:
            for batch in self.dataloader:
                if batch.images is None:  # a validation batch of bad rows only
                    carried.update(batch.skipped)
                    continue
                if carried:  # its skips travel with the next real batch
                    batch = batch._replace(skipped=dict(carried + Counter(batch.skipped)))
                    carried.clear()
                count += 1
                yield batch
        except DataError as error:
            raise DataError(str(error)) from None  # drop the DataLoader's worker traceback
        if count == 0 and self.num_batches != 0:  # 0: this rank was planned no data (val)
            raise DataError(f"{self.name} gave no batch this epoch: every sample was skipped as "
                            "bad data or the shards are empty (see the warnings above)")
