"""Data sets that ship inside installed packages (nothing is downloaded at run time)."""
from .digits import load_digits

__all__ = ["load_digits"]
