"""Parameter strings -> torch objects: shape, device, dtype, memory format.

What this machine cannot run is a skip (:func:`suites.harness.matrix.skip`); a value
outside the matrix is a ``ValueError`` naming what was expected.
"""

from __future__ import annotations

import dataclasses

import torch

from .matrix import skip


def parse_shape(shape: str) -> tuple[int, ...]:
    """``"64x56x56"`` -> ``(64, 56, 56)``; ``"512"`` -> ``(512,)``."""
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 'CxHxW', 'C' or 'CxDxHxW', got {shape!r}") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 4:
        raise ValueError(f"shape must look like 'CxHxW', 'C' or 'CxDxHxW', got {shape!r}")
    return dims


def torch_device(device: str) -> torch.device:
    """The device, or a skip when it is not on this machine.

    CUDA is only touched here, in setup (a forked benchmark process), never at import:
    asv's fork server imports the suites once and a CUDA context must not be forked.
    """
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            skip("CUDA is not available on this machine")
        return torch.device("cuda")
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            skip("this CUDA device has no bfloat16 support")
        return torch.bfloat16
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def torch_memory_format(memory_format: str, rank: int) -> torch.memory_format:
    if memory_format == "contiguous":
        return torch.contiguous_format
    if memory_format == "channels_last":
        if rank != 4:
            skip(f"channels_last is defined for 4-d tensors only (this input is {rank}-d)")
        return torch.channels_last
    raise ValueError(f"memory_format must be 'contiguous' or 'channels_last', got {memory_format!r}")


@dataclasses.dataclass(frozen=True)
class Input:
    """A benchmark input's decoded parameters: per-sample dims, device, dtype and memory format."""

    dims: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format

    def randn(self, group_size: int, generator: torch.Generator) -> torch.Tensor:
        """A seeded standard-normal input of ``group_size`` samples, on the device, in the dtype and layout."""
        x = torch.randn((group_size, *self.dims), generator=generator)
        return x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)


def decode_input(shape: str, device: str, dtype: str, memory_format: str) -> Input:
    """The four input parameters decoded together (each may skip, see the functions above)."""
    dims = parse_shape(shape)
    torch_dev = torch_device(device)
    return Input(dims, torch_dev, torch_dtype(dtype, torch_dev), torch_memory_format(memory_format, 1 + len(dims)))
