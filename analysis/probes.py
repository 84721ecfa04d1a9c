"""Load the drift and training probes' results through the results contract (:mod:`bkn.probes.results`).

``results/accuracy/drift.parquet`` (:data:`bkn.probes.results.DRIFT`) and
``results/convergence/convergence.parquet`` (:data:`bkn.probes.results.TRAINING`) and the GPU check's
``results/gpu/gpu.parquet`` (:data:`bkn.probes.results.GPU`), each with the
``meta.json`` beside it (the environment record and the probe's arguments). The columns,
dtypes and schema versions are the contract's; nothing here repeats them.

Runs on your model and data (``--model``, ``--data imagefolder:PATH``; :mod:`bkn.probes.sources`) write
the same files under ``results/yours/<run>/`` (``accuracy/drift.parquet``, ``convergence/convergence.parquet``);
their rows are added to the built-in ones (their ``data`` and ``network`` columns name the data and the
model), so the sections show them beside the built-in setups.

A missing file gives a frame of ``None`` (the report says which command produces it); a
file the contract rejects (corrupt, another schema version, written by older code) gives
``None``, a warning naming the file, the column and the command that rewrites it, and the
same text in :attr:`ProbeResults.problem` for the section to show.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pandas as pd

from bkn.probes.results import DRIFT, GPU, TRAINING, Schema, SchemaError

from .messages import Messages

YOURS = "yours"  # results/yours/<run>/: the probes' runs on your model and data


@dataclasses.dataclass
class ProbeResults:
    """One probe's tidy frame (None when absent or unreadable) and its meta.json (empty when absent)."""

    schema: Schema
    frame: pd.DataFrame | None
    meta: dict
    path: pathlib.Path
    meta_path: pathlib.Path
    problem: str | None = None  # why a present file was not loaded
    yours: list[pathlib.Path] = dataclasses.field(default_factory=list)  # results/yours/<run>/ files added

    @property
    def command(self) -> str:
        return self.schema.command


def _read_meta(path: pathlib.Path, messages: Messages) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        messages.warn(f"{path}: corrupt or unreadable metadata ({exc}); ignored.")
        return {}
    if not isinstance(data, dict):
        messages.warn(f"{path}: expected a JSON object; ignored.")
        return {}
    return data


def load_probe(results: str | pathlib.Path, schema: Schema, messages: Messages) -> ProbeResults:
    """``<results>/<schema.folder>/<schema.file>`` and the meta.json beside it, with the rows of
    ``<results>/yours/<run>/<schema.folder>/<schema.file>`` (runs on your model and data) added."""
    path = schema.path(results)
    meta_path = path.parent / "meta.json"
    frame, problem = None, None
    try:
        frame = schema.read(path)
    except FileNotFoundError:
        pass
    except SchemaError as exc:
        problem = str(exc)
        messages.warn(f"{problem}; its section is left out.")
    frames, yours = [] if frame is None else [frame], []
    for extra in sorted(pathlib.Path(results).glob(f"{YOURS}/*/{schema.folder}/{schema.file}")):
        try:
            frames.append(schema.read(extra))
            yours.append(extra)
        except SchemaError as exc:
            messages.warn(f"{exc}; left out of the report.")
    if yours:
        frame = pd.concat(frames, ignore_index=True)
    return ProbeResults(schema, frame, _read_meta(meta_path, messages), path, meta_path, problem, yours)


def load_drift(results: str | pathlib.Path, messages: Messages) -> ProbeResults:
    return load_probe(results, DRIFT, messages)


def load_training(results: str | pathlib.Path, messages: Messages) -> ProbeResults:
    return load_probe(results, TRAINING, messages)


def load_gpu(results: str | pathlib.Path, messages: Messages) -> ProbeResults:
    """The GPU check's tidy file, ``results/gpu/gpu.parquet`` (``python -m suites.gpu``)."""
    return load_probe(results, GPU, messages)
