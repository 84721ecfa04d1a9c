"""The results contract: what every result file holds, how it is written and how it is read back.

One place for the probes (which write) and ``analysis/`` (which reads):

* :class:`Schema`: a result file's columns, dtypes and schema version, and the command
  that rewrites it. :data:`DRIFT` (the drift probe, ``results/accuracy/drift.parquet``),
  :data:`TRAINING` (the training probe, ``results/convergence/convergence.parquet``) and
  :data:`GPU` (the GPU check, ``results/gpu/gpu.parquet``).
  :meth:`Schema.write` stores the version in the parquet file's metadata (and in
  ``meta.json``); :meth:`Schema.read` gives a :class:`SchemaError` that names the file,
  the offending column and the command to run when a file does not match, including
  files written before schemas had versions.
* the asv vocabulary: the benchmark parameter names the suites declare and the report
  reads (:data:`LAYER_PARAMS` ...), and the copy-bandwidth reference benchmark.
* :func:`environment` (commit, torch version, device, threads...), :func:`git_commit`,
  and :func:`atomic_path`: a result is written to a temporary file beside its target
  and renamed over it only once complete, so an interrupted run never leaves a
  half-written file and never destroys the previous one.
* shards: a sweep (:mod:`bkn.probes.sweeps`) writes each finished run's rows at once to
  ``<out>/shards/<schema>/<run key>.parquet`` (:meth:`Schema.write_shard`, atomically); a
  rerun reads them back (:meth:`Schema.read_shards`) and runs only the rest, and the
  results file is written from them, in the runs' order, once every run is done.

This module imports only the standard library at import time (pandas and pyarrow when
a frame is written or read; torch only inside :func:`environment`), so the report builder
never loads torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import tempfile
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout (bkn/probes/results.py)
SCHEMA_KEY = b"bkn.schema"  # parquet key-value metadata: {"name": ..., "version": ...}

# What every result row records about where it came from (the rest is in meta.json).
ENVIRONMENT_COLUMNS = {"commit": "string", "torch": "string", "device": "string", "threads": "int64"}


class SchemaError(ValueError):
    """A result file that this code cannot read: missing columns, another schema version, corrupt."""


@dataclasses.dataclass(frozen=True)
class Schema:
    """One kind of result file: where it lives, its columns (name -> dtype), its version, its command."""

    name: str
    folder: str  # under the results root
    file: str
    version: int
    columns: dict  # name -> pandas dtype ("string", "int64", "float64"); environment columns appended
    command: str  # what (re)writes the file
    about: str = ""

    def path(self, results: str | os.PathLike = "results") -> pathlib.Path:
        return pathlib.Path(results) / self.folder / self.file

    @property
    def all_columns(self) -> dict:
        return {**self.columns, **ENVIRONMENT_COLUMNS}

    def frame(self, rows, env: dict):
        """Tidy frame of ``rows`` (dicts with the schema's own columns) plus the environment columns."""
        import pandas as pd

        rows = list(rows)
        frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(self.columns))
        for key in ENVIRONMENT_COLUMNS:
            frame[key] = env[key]
        return self.conform(frame, f"{self.name} rows", _WRITER_BUG)

    def conform(self, frame, where: str, fix: str | None = None):
        """``frame`` with exactly the schema's columns, in order and dtype; SchemaError otherwise.

        ``where`` names the frame (a file's path) and ``fix`` what to do about a mismatch
        (default: rerun the command that rewrites the file).
        """
        fix = fix or f"rerun `{self.command}` to rewrite it"
        expected = self.all_columns
        missing = [c for c in expected if c not in frame.columns]
        if missing:
            extra = [c for c in frame.columns if c not in expected]
            has = f"; it has {', '.join(map(repr, extra))}, which the schema does not know" if extra else ""
            raise SchemaError(
                f"{where}: column {missing[0]!r} is missing{has} ({self.name} schema v{self.version} expects "
                f"{', '.join(expected)}); {fix}"
            )
        try:
            return frame[list(expected)].astype(expected)
        except (ValueError, TypeError) as exc:
            raise SchemaError(
                f"{where}: a column does not hold {self.name} schema v{self.version}'s types ({exc}); {fix}"
            ) from None

    def write(self, frame, record: dict, out: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
        """Write ``<out>/<file>`` (schema version in its metadata) and ``<out>/meta.json``, each atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = pathlib.Path(out)
        frame = self.conform(frame, f"{self.name} results", _WRITER_BUG)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        stamp = json.dumps({"name": self.name, "version": self.version}).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), SCHEMA_KEY: stamp})
        with atomic_path(out / self.file) as tmp:
            pq.write_table(table, tmp)
        meta = write_json(out / "meta.json", {**record, "schema": {"name": self.name, "version": self.version}})
        return out / self.file, meta

    def read(self, path: str | os.PathLike):
        """The frame in ``path``; ``FileNotFoundError`` if absent, :class:`SchemaError` if it does not match."""
        import pandas as pd
        import pyarrow.parquet as pq

        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {self.name} results; `{self.command}` writes them")
        try:
            metadata = pq.read_schema(path).metadata or {}
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for truncated or foreign files
            raise SchemaError(
                f"{path}: corrupt or truncated parquet file ({type(exc).__name__}: {exc}); "
                f"rerun `{self.command}` to rewrite it"
            ) from None
        stamp = _stamp(metadata.get(SCHEMA_KEY))
        if stamp is None:
            try:
                self.conform(frame, str(path))
                detail = ""
            except SchemaError as exc:
                detail = ": " + str(exc).split(": ", 1)[1].split(" (")[0]
            raise SchemaError(
                f"{path}: written by an older version of the suite (no schema version recorded){detail}; "
                f"this code reads {self.name} schema v{self.version}: rerun `{self.command}` to rewrite it"
            )
        if stamp != {"name": self.name, "version": self.version}:
            raise SchemaError(
                f"{path}: holds {stamp.get('name')} schema v{stamp.get('version')}, this code reads "
                f"{self.name} schema v{self.version}; rerun `{self.command}` to rewrite it"
            )
        return self.conform(frame, str(path))

    # -- shards: one finished run of a sweep, written the moment it ends (bkn.probes.sweeps) --------
    def shard_folder(self, out: str | os.PathLike) -> pathlib.Path:
        """``<out>/shards/<name>``: one file per finished run, named by the run's key."""
        return pathlib.Path(out) / SHARDS / self.name

    def write_shard(self, out: str | os.PathLike, key: str, rows, record: dict) -> pathlib.Path:
        """One run's ``rows`` (the schema's own columns, no environment) and its JSON-able ``record``
        (what ``meta.json`` gathers: skipped units, timings...) in one parquet file, atomically."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(self.columns))
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise SchemaError(f"{self.name} shard {key}: column {missing[0]!r} is missing; {_WRITER_BUG}")
        table = pa.Table.from_pandas(frame[list(self.columns)].astype(self.columns), preserve_index=False)
        stamp = {"name": self.name, "version": self.version, "key": key, "record": record}
        table = table.replace_schema_metadata({SCHEMA_KEY: json.dumps(stamp, default=str).encode()})
        path = self.shard_folder(out) / f"{key}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def read_shards(self, out: str | os.PathLike, keys=None) -> dict:
        """``{key: (frame, record)}`` of the finished runs under ``<out>/shards/<name>`` (those of ``keys``
        when given). A shard of another schema version, or unreadable, counts as not done (it is run again)."""
        import pandas as pd
        import pyarrow.parquet as pq

        folder = self.shard_folder(out)
        paths = sorted(folder.glob("*.parquet")) if keys is None else [folder / f"{k}.parquet" for k in keys]
        found = {}
        for path in paths:
            if not path.exists():
                continue
            try:
                stamp = _stamp(pq.read_schema(path).metadata.get(SCHEMA_KEY)) or {}
                frame = pd.read_parquet(path)
            except Exception:  # a foreign or damaged file: the run is done again and the file replaced
                continue
            if (stamp.get("name"), stamp.get("version"), stamp.get("key")) == (self.name, self.version, path.stem):
                found[path.stem] = (frame.astype(self.columns), stamp.get("record") or {})
        return found


SHARDS = "shards"  # <out>/shards/<schema name>/<run key>.parquet
_WRITER_BUG = "the code that produced these rows does not follow bkn.probes.results (a bug: nothing was written)"


def _stamp(raw: bytes | None) -> dict | None:
    try:
        stamp = json.loads(raw) if raw else None
    except ValueError:
        return None
    return stamp if isinstance(stamp, dict) else None


DRIFT = Schema(
    name="drift",
    folder="accuracy",
    file="drift.parquet",
    version=3,  # v3: mode, layer "output" (end to end), bias/noise/rmse and input-drift metrics
    columns={
        "data": "string",  # synthetic, digits, photos
        "network": "string",  # residual-chain, cifar-resnet20, resnet18
        "state": "string",  # init, trained (with BN), trained-own (with the measured method)
        "method": "string",  # a bkn.methods name, "<method>-ema" (its running estimates) or "floor"
        "group_size": "int64",  # samples per normalization group
        "mode": "string",  # in-network, or isolation (every earlier layer normalizing with its population statistics)
        "layer": "string",  # a normalization layer's module name, or "output" (end to end)
        "depth": "int64",  # position of the layer in execution order ("output": the number of layers)
        "metric": "string",  # one of DRIFT_METRICS
        "statistic": "string",  # median or p90 over groups x channels; rms over channels; mean; overall
        "seed": "int64",
        "value": "float64",
    },
    command="nox -s accuracy",
    about="the drift probe: estimated vs population statistics, per method, group size and layer, and end to end",
)

TRAINING = Schema(
    name="training",
    folder="convergence",
    file="convergence.parquet",
    version=4,  # v3: world_size; v4: data, network, evaluation (test_acc_precise became evaluation "population")
    columns={
        "data": "string",  # mnist1d, digits
        "network": "string",  # convnet, resnet1d (mnist1d); cifar-resnet (digits)
        "method": "string",  # a bkn.methods name
        "group_size": "int64",  # samples per normalization group (the SGD batch for per-sample norms and syncbn)
        "batch_size": "int64",  # samples per SGD step (over all workers)
        "world_size": "int64",  # data-parallel workers sharing each SGD step (batch_size / world_size each)
        "seed": "int64",
        "epoch": "int64",
        "evaluation": "string",  # a key of EVALUATIONS: how the network normalized when the value was measured
        "metric": "string",
        "value": "float64",
    },
    command="nox -s convergence",
    about="the training probe: test accuracy vs normalization group size, per data set, network and method",
)

GPU = Schema(
    name="gpu",
    folder="gpu",
    file="gpu.parquet",
    version=1,
    columns={
        "part": "string",  # bandwidth, layer, network, graph, tests, asv (suites.gpu's parts)
        "item": "string",  # a bkn.methods name, "torch-bn" (the baseline), "copy", a test file, "asv"
        "shape": "string",  # the input, "8x64x56x56", or a network and its input, "resnet18-8x3x224x224"
        "dtype": "string",  # float32, bfloat16; "" where none applies
        "mode": "string",  # fwd+bwd (a layer), eager or graphed (a training step); "" where none applies
        "metric": "string",  # time_s, ratio_to_bn, copy_Bps, achieved_Bps, fraction_of_copy, loss_rel, ...
        "value": "float64",  # NaN for a row that records a skip or a failure
        "target": "float64",  # the target for this metric (a ratio bound, a fraction), NaN where none
        "status": "string",  # ok, failed, skipped
        "note": "string",  # why a part was skipped or failed; what a number is
        "triton": "string",  # triton's version, or "none"
        "device_name": "string",  # torch.cuda.get_device_name(), or the CPU's model
        "backend": "string",  # which implementation the layers took on the device's tensors (bkn.kernels)
    },
    command="python -m suites.gpu",
    about="the GPU check: copy bandwidth, CUDA tests, graph replay, the layer table and network steps",
)

SCHEMAS = {s.name: s for s in (DRIFT, TRAINING, GPU)}

# The drift probe's metrics (docs/design.md §9, computed by bkn.probes.stats.metrics) and per-layer
# statistics, in the order reports show them; the training probe's metrics.
DRIFT_METRICS = (
    "mean_error",
    "var_logratio",
    "kl",
    "output_discrepancy",
    # bias/noise decomposition over groups (statistic "rms"; "*_signed_bias": "mean"): mean in population
    # sigma, variance relative to the population's; rmse^2 = bias^2 + noise^2
    "mean_rmse",
    "mean_bias",
    "mean_noise",
    "mean_signed_bias",
    "var_rmse",
    "var_bias",
    "var_noise",
    "var_signed_bias",
    # what upstream layers did to the layer's input (in-network mode; median, p90)
    "input_mean_drift",
    "input_var_drift",
    # end to end, layer "output" (statistic "overall")
    "agreement",
    "logit_discrepancy",
    "accuracy",
    "accuracy_population",
)
DRIFT_STATISTICS = ("median", "p90", "rms", "mean", "overall")
TRAINING_METRICS = ("train_loss", "test_acc", "step_time_s")
# The training probe's evaluation modes: what the network normalized with when a value was measured.
EVALUATIONS = {
    "training": "training mode (each group's own statistics)",
    "running": "running estimates (GN, LN: per-sample statistics)",
    "population": "population statistics recomputed after training (PreciseBN)",
}

# -- asv vocabulary: the parameters the suites declare and the report reads --------------------
METHOD_PARAM = "method"  # a bkn.methods name
GROUP_PARAM = "group_size"  # samples the norm computes its statistics over
LAYER_PARAMS = (METHOD_PARAM, GROUP_PARAM, "shape", "device", "dtype", "memory_format")
TENSOR_PARAMS = LAYER_PARAMS[1:]  # the copy reference: the same tensors, no method
VARIANT_PARAMS = ("dtype", "memory_format")  # secondary axes; the report shows the default first
DEFAULT_VARIANT = {"dtype": "float32", "memory_format": "contiguous"}
# The copy-bandwidth reference: the time to copy the tensors a layer benchmark normalizes.
COPY_REFERENCE = "bench_bandwidth.TimeCopy.time_copy"
# Tensor-sized reads and writes an operation on the benchmark's tensor (group_size x shape)
# must do at least, by the benchmark's method name (the part after the last dot): forward
# reads x and writes y; forward + backward also reads x and dy and writes dx; a copy reads
# and writes once. Bytes moved = passes x elements x element size; the report divides by the
# time to give achieved bytes per second, next to the copy's.
TENSOR_PASSES = {
    "time_copy": 2,
    "time_forward": 2,
    "time_forward_train": 2,
    "time_forward_inference": 2,
    "time_forward_backward": 5,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # the ``dtype`` parameter's element sizes
# The fair pair behind the chain-cost figure: a BKN layer alone given its prior, and a
# conv + norm + ReLU block with the prior's propagation through the block's convolution.
LAYER_BENCHMARK = "bench_layers.TimeForwardBackward.time_forward_backward"
BLOCK_BENCHMARK = "bench_blocks.TimeBlockForwardBackward.time_block_forward_backward"


# -- provenance and atomic writes --------------------------------------------------------------
def git_commit(path: str | os.PathLike = ROOT) -> str:
    """The commit checked out at ``path`` (with ``+dirty`` when the tree has changes), or ``"unknown"``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what :mod:`platform` knows."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def environment(device="cpu") -> dict:
    """What every result records: commit, versions, device, threads, time (imports torch)."""
    import torch

    device = torch.device(device)
    return {
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    On an exception (or KeyboardInterrupt) the temporary file is removed and
    ``target``, if it existed, is left untouched.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(target: str | os.PathLike, data) -> pathlib.Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return pathlib.Path(target)
