"""Data sets that ship inside installed packages (nothing is downloaded at run time).

:class:`Dataset` (one labelled split in memory, with seeded batches) is what the probes
use; `digits_dataset` and `photos_dataset` build one; :func:`load_digits` and
:func:`load_photos` return the bare tensors.
"""

from .dataset import Dataset, digits_dataset, photos_dataset
from .digits import load_digits
from .photos import load_photos

__all__ = ["Dataset", "digits_dataset", "photos_dataset", "load_digits", "load_photos"]
