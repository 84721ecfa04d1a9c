"""Data sets that ship inside installed packages or are generated locally (nothing is downloaded at run time).

:class:`Dataset` (one labelled split in memory, with seeded batches) is what the probes
use; `digits_dataset`, `mnist1d_dataset` and `photos_dataset` build one; :func:`load_digits`,
:func:`load_mnist1d` and :func:`load_photos` return the bare tensors.
"""

from bkn.probes.data.dataset import Dataset, digits_dataset, mnist1d_dataset, photos_dataset
from bkn.probes.data.digits import load_digits
from bkn.probes.data.mnist1d import load_mnist1d
from bkn.probes.data.photos import load_photos

__all__ = [
    "Dataset",
    "digits_dataset",
    "mnist1d_dataset",
    "photos_dataset",
    "load_digits",
    "load_mnist1d",
    "load_photos",
]
