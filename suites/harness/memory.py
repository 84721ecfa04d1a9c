"""The activation memory a layer adds to a training step: bytes autograd saves for the backward."""

from __future__ import annotations

import torch


def saved_tensor_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    This is the activation memory a layer adds to a training step (what stays alive from
    the forward until the backward), counted exactly, independent of allocator and
    process baseline. A saved view counts its whole storage, since that stays alive.
    """
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[(t.device.type, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())
