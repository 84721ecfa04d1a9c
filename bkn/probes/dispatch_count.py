"""Count the aten ops and host synchronisations of a training step (the accelerator path).

A host sync (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, a tensor in an ``if``) makes
the CPU wait for the GPU queue to drain and rules out CUDA-graph capture. Every one of them
reaches the dispatcher as ``aten._local_scalar_dense`` (``aten.item`` / ``aten.is_nonzero``
decompose into it above the Python dispatch key; they are listed in case a build keeps them),
so a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every op of the step,
backward included, counts them exactly.

Syncs inside :func:`bkn.layers._checks.device_check` are not counted: on CUDA that check is
``torch._assert_async`` (no sync); only on CPU tensors, where there is no queue to drain, does
it read the condition on the host to raise a ``ValueError``. The checker marks a thread-local
flag while it runs (:func:`bkn.layers._checks.checking`), which :class:`DispatchCounter` reads.

The accelerator path: CPU float tensors normally take the compiled kernels of ``bkn/csrc``
(:mod:`bkn.layers._native`); :func:`accelerator_path` switches them off for a block, so the
CPU runs the Python Functions that CUDA tensors took before the Triton kernels
(``--backend torch``, the default). ``--backend triton`` runs the Triton kernels
(``bkn/kernels/triton_norm*.py``) instead, on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, which ``main`` sets), and counts their launches
(:func:`bkn.kernels.count_launches`) beside the aten ops: a Triton launch is one kernel, as
an aten op is (at most) one. ``python -m bkn.probes.dispatch_count`` prints the table of
docs/speed.md.

Not every aten op launches a GPU kernel: views and metadata ops (``view``, ``detach``,
``transpose``, ``select``, ``unbind``, ...) only make a new tensor header, and ``empty*``
allocations come from the caching allocator without a kernel. :data:`NO_KERNEL_OPS` is the one
list of such ops; ``kernel ops`` are all the others (:func:`kernel_ops`), and the launches of a
step on CUDA are its kernel ops plus its Triton launches. The raw op count is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import traceback
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bkn import kernels
from bkn.layers import _checks, _native

BACKENDS = ("torch", "triton")

SYNC_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_local_scalar_dense", "item", "is_nonzero")
    if hasattr(torch.ops.aten, name)
)

# Aten ops that launch no GPU kernel on CUDA (by overload packet name): views and metadata ops
# (a new tensor header over the same storage) and allocations (the caching allocator hands out
# memory without a kernel). ``reshape``/``flatten`` are not listed: they decompose above the
# dispatcher into a view (listed) or a copy (``clone``/``_unsafe_view`` of one: the copy counts).
# ``_local_scalar_dense`` is not listed: it copies to the host (and is counted as a sync).
NO_KERNEL_OPS = frozenset(
    {
        # views and metadata
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "alias",
        "detach",
        "t",
        "transpose",
        "expand",
        "as_strided",
        "unsqueeze",
        "squeeze",
        "slice",
        "select",
        "permute",
        "unbind",
        "split",
        "split_with_sizes",
        "narrow",
        "view_as_real",
        "view_as_complex",
        # allocations
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
    }
)


def kernel_ops(ops: Counter) -> int:
    """The ops in the ``name -> count`` counter ``ops`` that launch a GPU kernel (not in :data:`NO_KERNEL_OPS`)."""
    return sum(n for name, n in ops.items() if name not in NO_KERNEL_OPS)


class DispatchCounter(TorchDispatchMode):
    """Counts every aten op (``ops``, by name) and every host sync outside ``device_check`` (``syncs``).

    With ``stacks=True`` each entry of ``syncs`` is the short Python stack (``file:line function``
    lines, innermost last) that asked for the value; otherwise the op's name.
    """

    def __init__(self, stacks: bool = False, depth: int = 8):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: list[str] = []
        self.stacks, self.depth = stacks, depth

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernel_total(self) -> int:
        """The ops that launch a GPU kernel (:func:`kernel_ops`)."""
        return kernel_ops(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        if func in SYNC_OPS and not _checks.checking():
            if self.stacks:
                frames = traceback.extract_stack()[:-1][-self.depth :]
                self.syncs.append("\n".join(f"{f.filename}:{f.lineno} {f.name}" for f in frames))
            else:
                self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def count(fn, stacks: bool = False) -> DispatchCounter:
    """Run ``fn()`` under a fresh :class:`DispatchCounter` and return the counter."""
    counter = DispatchCounter(stacks=stacks)
    with counter:
        fn()
    return counter


@contextlib.contextmanager
def accelerator_path():
    """Within the block the compiled CPU kernels are off (``_native.load`` returns None), whatever ``BKN_NATIVE``."""
    saved = _native.load
    _native.load = lambda: None
    try:
        yield
    finally:
        _native.load = saved


def small_net(identity_norms: bool = False) -> nn.Module:
    """Two conv-BN-ReLU stages and a linear head on 3x8x8 inputs; ``identity_norms``: BN replaced by nn.Identity."""
    norm = (lambda c: nn.Identity()) if identity_norms else nn.BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


NORM_LAYERS = 2  # in small_net


def _step(model: nn.Module, x, target, optimizer):
    def run():
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    return run


@contextlib.contextmanager
def backend(name: str):
    """``BKN_BACKEND=name`` within the block (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` already set)."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "triton" and not kernels.interpreting():
        raise ValueError(
            f"backend triton on CPU tensors runs in Triton's interpreter: set {kernels.INTERPRET_SWITCH}=1 "
            "before the first Triton kernel is defined (python -m bkn.probes.dispatch_count --backend triton does)"
        )
    saved = os.environ.get(kernels.ENV_SWITCH)
    os.environ[kernels.ENV_SWITCH] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(kernels.ENV_SWITCH, None)
        else:
            os.environ[kernels.ENV_SWITCH] = saved


def measure_method(
    name: str, batch: int = 8, group_size: int = 2, sgd: bool = False, stacks: bool = False, backend_name="torch"
) -> dict:
    """Ops, Triton launches and host syncs of one training step of :func:`small_net` converted to method ``name``.

    The step is forward, cross-entropy, backward (and an SGD step if ``sgd``), on the accelerator
    path (:func:`accelerator_path`) with the backend ``backend_name`` (``torch``: the Python
    Functions; ``triton``: the Triton kernels), after one warm-up step (first-call work is not a
    step's). Returns ``{"ops": total aten ops, "ops_per_norm": ..., "kernel_ops_per_norm": the
    ops that launch a kernel (:func:`kernel_ops`), "launches": Triton launches, "launches_per_norm":
    ..., "per_norm": ops + launches per norm, "kernel_launches_per_norm": kernel ops + Triton
    launches per norm, "syncs": count, "where": [stacks]}``; ``*_per_norm`` = (the step's count -
    that of the same step of the net with its norms replaced by ``nn.Identity``) / the number of
    norm layers (2).
    """
    import bkn.methods

    torch.manual_seed(0)
    x = torch.randn(batch, 3, 8, 8)
    target = torch.randint(0, 10, (batch,))
    counts = []
    for identity in (False, True):
        torch.manual_seed(1)
        model = small_net(identity)
        if not identity:
            model = bkn.methods.get(name).convert(model, group_size=group_size)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if sgd else None
        with accelerator_path(), backend(backend_name):
            step = _step(model, x, target, optimizer)
            step()  # warm-up
            model.zero_grad(set_to_none=True)
            with kernels.count_launches() as launched:
                counter = count(step, stacks=stacks)
            counts.append((counter, sum(launched.values())))
    (net, launches), (bare, bare_launches) = counts
    ops_per_norm = (net.total - bare.total) / NORM_LAYERS
    launches_per_norm = (launches - bare_launches) / NORM_LAYERS
    kernel_ops_per_norm = (net.kernel_total - bare.kernel_total) / NORM_LAYERS
    return {
        "ops": net.total,
        "ops_per_norm": ops_per_norm,
        "kernel_ops_per_norm": kernel_ops_per_norm,
        "kernel_launches_per_norm": kernel_ops_per_norm + launches_per_norm,
        "launches": launches,
        "launches_per_norm": launches_per_norm,
        "per_norm": ops_per_norm + launches_per_norm,
        "syncs": len(net.syncs),
        "where": net.syncs,
    }


@contextlib.contextmanager
def single_process_group():
    """A 1-process gloo group in this process (for ``syncbn``), torn down afterwards; a no-op if one exists."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    import bkn.methods

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", help="registry methods (default: all)")
    parser.add_argument("--sgd", action="store_true", help="include an SGD step")
    parser.add_argument("--where", action="store_true", help="print the stack of each host sync")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch: the Python Functions (default); triton: the Triton kernels, here in Triton's interpreter",
    )
    args = parser.parse_args(argv)
    if args.backend == "triton":  # CPU tensors: the interpreter, on before the kernels are defined
        os.environ[kernels.INTERPRET_SWITCH] = "1"
    header = (
        f"{'method':28s} {'ops/step':>9s} {'ops/norm':>9s} {'kernel ops/norm':>16s} {'triton/norm':>12s} "
        f"{'ops+triton/norm':>16s} {'launches/norm':>14s}"
    )
    print(f"{header} {'syncs':>6s}")
    with single_process_group():
        for name in args.methods or bkn.methods.names():
            r = measure_method(name, sgd=args.sgd, stacks=args.where, backend_name=args.backend)
            print(
                f"{name:28s} {r['ops']:9d} {r['ops_per_norm']:9.1f} {r['kernel_ops_per_norm']:16.1f} "
                f"{r['launches_per_norm']:12.1f} {r['per_norm']:16.1f} {r['kernel_launches_per_norm']:14.1f} "
                f"{r['syncs']:6d}"
            )
            if args.where:
                for stack in r["where"]:
                    print("    " + stack.replace("\n", "\n    ") + "\n")


if __name__ == "__main__":
    main()
