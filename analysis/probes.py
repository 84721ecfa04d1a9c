"""Load the accuracy and training probes' results (tidy parquet + meta.json) into frames.

``results/accuracy/drift.parquet``: one row per data x network x state x method x
batch_size x layer x metric x statistic x seed (columns :data:`DRIFT_COLUMNS`), and
``results/accuracy/meta.json`` (the environment record and the probe's arguments).
``results/convergence/convergence.parquet``: one row per method x group_size x seed x
epoch x metric (:data:`CONVERGENCE_COLUMNS`), and ``results/convergence/meta.json``.

A missing file gives ``None`` (the report says which command produces it); an
unreadable or malformed one gives ``None`` and a warning naming it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pandas as pd

from .messages import Messages

DRIFT_COLUMNS = ["data", "network", "state", "method", "batch_size", "layer", "depth", "metric", "statistic",
                 "seed", "value"]
CONVERGENCE_COLUMNS = ["method", "group_size", "seed", "epoch", "metric", "value"]
ENVIRONMENT_COLUMNS = ["commit", "torch", "device", "threads"]


@dataclasses.dataclass
class ProbeResults:
    """One probe's tidy frame (None when absent or unreadable) and its meta.json (empty when absent)."""

    frame: pd.DataFrame | None
    meta: dict
    path: pathlib.Path
    meta_path: pathlib.Path


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


def _read_frame(path: pathlib.Path, required: list[str], messages: Messages) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for truncated / foreign files
        messages.warn(f"{path}: corrupt or truncated parquet file ({type(exc).__name__}: {exc}); "
                      "its section is left out.")
        return None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        messages.warn(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(required)}); "
                      "its section is left out.")
        return None
    frame = frame.copy()
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    return frame


def load_probe(
    folder: str | pathlib.Path, name: str, required: list[str], messages: Messages
) -> ProbeResults:
    folder = pathlib.Path(folder)
    path, meta_path = folder / f"{name}.parquet", folder / "meta.json"
    return ProbeResults(
        frame=_read_frame(path, required, messages),
        meta=_read_meta(meta_path, messages),
        path=path,
        meta_path=meta_path,
    )


def load_drift(results: str | pathlib.Path, messages: Messages) -> ProbeResults:
    """``<results>/accuracy/drift.parquet`` and its meta.json."""
    return load_probe(pathlib.Path(results) / "accuracy", "drift", DRIFT_COLUMNS, messages)


def load_convergence(results: str | pathlib.Path, messages: Messages) -> ProbeResults:
    """``<results>/convergence/convergence.parquet`` and its meta.json."""
    return load_probe(pathlib.Path(results) / "convergence", "convergence", CONVERGENCE_COLUMNS, messages)
