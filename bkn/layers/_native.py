"""The compiled kernels of ``bkn/csrc/``, built on first use as one extension; or None.

The training forward and backward of BKN, ghost-batch BN and BRN exist twice: as Python
autograd Functions (``_function.py``, ``_renorm_function.py``; they run everywhere and are the
reference) and as C++ autograd Functions for CPU float32/float64 tensors. The maths is
the same; the C++ ones shed the fixed cost of the Python ones (the autograd Function
machinery and dozens of per-channel operations at microseconds of dispatch each), which
dominates at the small shapes of deep network stages.

The extension is compiled with :func:`torch.utils.cpp_extension.load` the first time a
layer needs it (about a minute, once per machine, source version and torch version),
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name that carries a hash of the sources (every file's
name and bytes, headers included), the torch version and the flags, so that checkouts of
different commits, or venvs with different torch builds, never load each other's builds.
The sources are compiled from copies inside the build directory, not from the checkout: the
build files (``build.ninja``) then name no checkout path, so two clones with the same
sources share one build instead of recompiling each other's in turn. It needs a C++
compiler with OpenMP (gcc)
and ninja (a dependency of this package). If the build fails a warning says so, once,
and the layers use the Python Functions: same results, slower at small shapes.
``BKN_NATIVE=0`` skips the attempt.

Which tensors take the compiled path is decided in C++ (``compiled_path_takes``): CPU
float32/float64 tensors of one dtype; for anything else it returns an empty list and the
caller runs the Python Function.

The sources, one file per kernel family, each named after the Python module that holds its
reference computation or calls it (ninja may compile them in parallel; one ``.so``):

* ``_function.cpp``: ``kalman_norm`` (BKN, ghost-batch BN), twin of ``bkn/layers/_function.py``;
* ``_renorm_function.cpp``: ``renorm`` (BRN), twin of ``bkn/layers/_renorm_function.py``;
* ``_units.h``: what those two share (units of work, moments, the affine pass, the backward);
* ``analytic_tap_sums.cpp`` (kernels in ``analytic_tap_sums.h``): ``tap_sums``,
  ``tap_sums_backward``, for ``tap_sums`` in ``bkn/transitions/analytic.py``;
* ``analytic_conv_moments.cpp``: ``conv_moments_forward`` / ``_backward`` (``conv_moments``
  in ``bkn/transitions/analytic.py``) and ``conv_moments_weight_grad``
  (``bkn/transitions/weight_grads.py``);
* ``analytic_relu_moments.cpp``: ``relu_moments_*`` and ``norm_relu_moments*``
  (``relu_moments``, ``norm_relu_moments`` in ``bkn/transitions/analytic.py``);
* ``_native_pool.cpp``: the memory pool behind :func:`cached_bytes` / :func:`release_cached`;
* ``_native.cpp``: the Python module (the bindings), with ``_native.h`` declaring every
  entry point; ``_common.h`` (includes, small helpers) and ``_simd.h`` (intrinsics, the
  run-time AVX2/FMA checks) are shared.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import warnings

import torch

SOURCE_DIR = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SOURCE_PATTERNS = ("*.cpp", "*.h")  # compiled: the .cpp files; the headers are hashed and staged with them
ENV_SWITCH = "BKN_NATIVE"

_module = None
_tried = False


def enabled() -> bool:
    """False when ``BKN_NATIVE`` is set to 0/false/no/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _ninja_on_path() -> None:
    # cpp_extension runs `ninja` from PATH; a venv that is not activated lacks its bin/.
    try:
        import ninja
    except ImportError:
        return
    bindir = getattr(ninja, "BIN_DIR", None)
    if bindir and bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])


def source_files() -> list[pathlib.Path]:
    """Every file of :data:`SOURCE_DIR` the build uses (sources and headers), sorted by name."""
    files = sorted({f for pattern in SOURCE_PATTERNS for f in SOURCE_DIR.glob(pattern)}, key=lambda f: f.name)
    if not any(f.suffix == ".cpp" for f in files):
        raise FileNotFoundError(f"no C++ sources in {SOURCE_DIR}")
    return files


def build_name(files: list[pathlib.Path], cflags: list[str], ldflags: list[str]) -> str:
    """The extension's name: a hash of the files' names and bytes (not their directory), torch's version, the flags.

    Names are hashed with the bytes so that code moved from one file to another is a new
    build; the directory is not, so that checkouts with identical sources share one build.
    """
    digest = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        digest.update(repr((f.name, len(data))).encode() + data)
    # torch's cache checks the sources and flags but not which torch built it: the name does.
    digest.update(repr((torch.__version__, cflags, ldflags)).encode())
    return f"bkn_fused_{digest.hexdigest()[:12]}"


def build(verbose: bool = False):
    """Compile (or load from the cache) the extension; return the module. Raises on failure."""
    from torch.utils import cpp_extension

    _ninja_on_path()
    # -fopenmp: at::parallel_for runs serially without it. The extension then shares torch's
    # own OpenMP runtime (the same soname, already loaded), so torch.set_num_threads governs it.
    cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    files = source_files()
    name = build_name(files, cflags, ldflags)
    directory = pathlib.Path(cpp_extension._get_build_directory(name, verbose=False))
    if not (directory / f"{name}.so").exists():
        print(
            f"bkn: compiling the fused C++ kernels into {directory} (once per machine, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    staged = [staged_source(directory, f) for f in files]  # headers too: the sources include them from there
    sources = [str(f) for f in staged if f.suffix == ".cpp"]
    return cpp_extension.load(name=name, sources=sources, extra_cflags=cflags, extra_ldflags=ldflags, verbose=verbose)


def staged_source(directory: pathlib.Path, source: pathlib.Path) -> pathlib.Path:
    """The copy of ``source`` (a file of :data:`SOURCE_DIR`) inside the build ``directory`` that the build uses.

    Rewritten only when its bytes differ (ninja rebuilds on a newer mtime), via a temporary
    file and a rename, so a concurrent build never reads half a file.
    """
    staged = directory / source.name
    data = source.read_bytes()
    if not staged.exists() or staged.read_bytes() != data:
        directory.mkdir(parents=True, exist_ok=True)
        partial = staged.with_name(f".{staged.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, staged)
    return staged


def load():
    """The compiled module, or None (disabled, or the build failed: warned once)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if not enabled():
        return None
    try:
        _module = build()
    except Exception as error:  # no compiler, no ninja, a broken toolchain: fall back, loudly
        warnings.warn(
            f"bkn: the fused C++ kernels could not be built ({type(error).__name__}: {error}); "
            f"using the Python implementation (same results, slower at small shapes). "
            f"Set {ENV_SWITCH}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        _module = None
    return _module


def cached_bytes() -> int:
    """Bytes of freed CPU memory the compiled kernels keep for reuse (0 without them).

    The analytic transition's weight gradients and tap sums come from a small caching
    allocator in ``bkn/csrc/_native_pool.cpp`` (as large as the network's convolution weights,
    allocated every step; glibc returns freed blocks of that size to the kernel, and every
    page then faults again), holding at most 512 MiB of freed blocks.
    """
    module = _module if _tried else None
    return 0 if module is None else int(module.pool_cached_bytes())


def release_cached() -> int:
    """Free the memory :func:`cached_bytes` counts (tensors in use are untouched); returns the bytes freed."""
    module = _module if _tried else None
    return 0 if module is None else int(module.pool_release_cached())
