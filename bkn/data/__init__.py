"""Data sets that ship inside installed packages (nothing is downloaded at run time)."""
from .digits import load_digits
from .photos import load_photos

__all__ = ["load_digits", "load_photos"]
