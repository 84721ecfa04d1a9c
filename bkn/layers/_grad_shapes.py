"""Shapes and dtypes of the gradients the norms' autograd Functions return (torch and Triton alike)."""

from __future__ import annotations

import torch


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a (G, C) gradient to the shape of the input it belongs to ((C,), (G, C), 0-d)."""
    if t.shape == shape:
        return t
    if t.dim() == len(shape) + 1 and t.shape[0] == 1 and t.shape[1:] == shape:
        return t[0]
    if len(shape) < t.dim():  # leading broadcast dims: sum_to_size needs equal rank
        t = t.sum(list(range(t.dim() - len(shape))))
    return t.sum_to_size(shape) if t.shape != shape else t


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
