"""Verdicts from interleaved rounds: the drift-robust comparison behind ``nox -s continuous``.

``python -m analysis.continuous BASE HEAD`` (:mod:`analysis.continuous`) measures the two
commits in ``R`` rounds; in round ``r`` it runs the tracking subset at one commit, then
at the other (base first in even rounds, head first in odd ones: ABBA order, so a
linear drift of the machine favours neither commit). It records each round's value of
every benchmark -- the fastest of that round's samples, or the one measurement of a
memory or ``track_`` benchmark -- in a *rounds file* (:func:`save`). Here, per benchmark:

* ``d_r = log(head_r / base_r)``: the two commits measured back to back in round ``r``,
  so whatever the machine did over minutes (another job starting, thermal state, the page
  cache) mostly cancels. Measured one after the other, this machine showed 2-3 false
  "significant" changes out of 81 (spec, "Regression gating"); that is the noise paired
  rounds remove;
* ``ratio = exp(mean d_r)`` (a geometric mean of the per-round ratios) and its ``1 - alpha``
  confidence interval ``exp(mean d +- t_{1-alpha/2, R-1} s_d / sqrt(R))``;
* ``p_value``: the two-sided one-sample t-test of ``mean d_r = 0`` (``R - 1`` degrees of
  freedom). Rounds, not samples, are the independent units: samples inside one round share
  its machine state, so a test over pooled samples (Mann-Whitney in
  :mod:`analysis.regressions`) calls a drift significant. When every ``d_r`` is equal
  (deterministic values: thread counts, often peak memory) the test is degenerate: p = 1
  when they are all 0, else 0;
* ``verdict``: ``regression`` when ``ratio >= 1 + threshold`` and ``p < alpha``;
  ``improvement`` when ``ratio <= 1 / (1 + threshold)`` and ``p < alpha``; ``not
  significant`` beyond the threshold otherwise; ``unchanged`` inside it; ``slower
  (untested)``/``faster (untested)`` with fewer than :data:`MIN_ROUNDS` paired rounds;
  ``failed`` (measured at base, not at head), ``fixed``, ``new``, ``removed``, ``skipped``;
* confirmation: ``analysis.continuous`` times the benchmarks of a first verdict ``regression``
  again, alone, in ``--confirm-rounds`` fresh rounds (rows of ``stage`` 1). The verdict stays
  ``regression`` only when those rounds, tested on their own, say ``regression`` too; otherwise
  it is ``not confirmed`` (the columns ``confirm_*`` hold the second test). A replication, not a
  pooling: the first rounds were selected for looking slow, so pooling them would keep their bias.
  Without it the gate flagged about 1.1-1.2x on unchanged code in 3 of roughly 10 CI runs on this
  shared machine (ratios 1.105-1.21, p 0.005-0.008); a real slowdown repeats, a burst of load
  rarely lands on the same commit twice in a row.

The default level, :data:`DEFAULT_ALPHA` = 0.01, is looser than the pooled test's 0.002
because each test here has only ``R - 1`` degrees of freedom; the threshold is what keeps
false alarms rare (a change must also be 10% or more). The false-alarm and detection
rates of the two together are measured on this machine by ``.ci/gate_calibration.py``
(suites/README.md, "Regression gating").
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pandas as pd

from bkn.probes.results import write_json

from .verdict_table import GROUP, change_verdict, check_levels, finish

ROUNDS_VERSION = 1
MIN_ROUNDS = 3  # paired rounds below which no test is made (2 degrees of freedom at least)
DEFAULT_ALPHA = 0.01
ROW_FIELDS = ("round", "position", "commit", "benchmark", "param_key", "type", "unit", "value", "n_samples")
OPTIONAL_FIELDS = {"stage": 0}  # 0: the first rounds; 1: confirmation rounds of the flagged benchmarks
COLUMNS = (
    *GROUP,
    "type",
    "unit",
    "base",
    "head",
    "ratio",
    "ci_low",
    "ci_high",
    "p_value",
    "significant",
    "rounds",
    "test",
    "verdict",
    "confirm_ratio",
    "confirm_p_value",
    "confirm_rounds",
)


def rounds_path(folder: str | pathlib.Path, base: str, head: str) -> pathlib.Path:
    """Where the rounds file of the pair (base, head) lives: ``<folder>/<base>-<head>.json`` (full hashes)."""
    return pathlib.Path(folder) / f"{base}-{head}.json"


def save(
    path: pathlib.Path, *, base: str, head: str, machine: str, env_name: str, rows: list[dict], meta: dict
) -> None:
    """Write a rounds file atomically: the pair, where it ran, and one row per round x commit x benchmark."""
    missing = [f for f in ROW_FIELDS if rows and f not in rows[0]]
    if missing:
        raise ValueError(f"rounds rows lack the fields {missing}; expected {list(ROW_FIELDS)}")
    write_json(
        path,
        {
            "version": ROUNDS_VERSION,
            "base": base,
            "head": head,
            "machine": machine,
            "env_name": env_name,
            **meta,
            "rows": rows,
        },
    )


def load(path: str | pathlib.Path) -> tuple[dict, pd.DataFrame]:
    """(header, tidy rows) of a rounds file; ValueError naming the file when it is not one."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the rounds file ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != ROUNDS_VERSION or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a rounds file of version {ROUNDS_VERSION} (written by analysis.continuous)")
    header = {k: v for k, v in data.items() if k != "rows"}
    frame = pd.DataFrame(data["rows"], columns=[*ROW_FIELDS, *OPTIONAL_FIELDS])
    for field, default in OPTIONAL_FIELDS.items():  # files written before the field existed
        frame[field] = frame[field].fillna(default).astype(type(default))
    frame["machine"] = data.get("machine", "")
    frame["env_name"] = data.get("env_name", "")
    return header, frame


def paired_test(base: np.ndarray, head: np.ndarray, alpha: float) -> tuple[float, float, float, float]:
    """(ratio, ci_low, ci_high, p) of head vs base from per-round values paired by position.

    See the module docstring; needs at least 2 pairs (NaN otherwise), positive values.
    """
    base, head = np.asarray(base, dtype=float), np.asarray(head, dtype=float)
    if base.shape != head.shape:
        raise ValueError(f"paired_test needs one head value per base value, got {base.shape} and {head.shape}")
    if (base <= 0).any() or (head <= 0).any():
        raise ValueError("paired_test needs positive values (times, bytes, counts)")
    n = len(base)
    if n < 2:
        return math.nan, math.nan, math.nan, math.nan
    d = np.log(head) - np.log(base)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0 or sd < 1e-12 * max(abs(mean), 1e-300):
        ratio = math.exp(mean)
        return ratio, ratio, ratio, (1.0 if mean == 0.0 else 0.0)
    from scipy import stats  # here: the report imports this module, and needs scipy only for a rounds file

    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2.0 * stats.t.sf(abs(t), n - 1))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1)) * se
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), p


def _verdict(ratio: float, p: float, rounds: int, threshold: float, alpha: float) -> tuple[object, str]:
    significant = None if rounds < MIN_ROUNDS else bool(p < alpha)
    return significant, change_verdict(ratio, significant, threshold, at_threshold=True)


def paired_verdicts(
    rows: pd.DataFrame, base: str, head: str, threshold: float = 0.10, alpha: float = DEFAULT_ALPHA
) -> pd.DataFrame:
    """One verdict row per benchmark x parameters (columns :data:`COLUMNS`), worst first.

    ``rows``: the tidy rows of a rounds file (:func:`load`). ``base``/``head``: the
    medians of the per-round values. Rounds where either commit has no finite positive
    value are left out of the pairing. Rows of ``stage`` 1 (confirmation rounds) decide only
    whether a first-stage ``regression`` stands (module docstring).
    """
    check_levels(threshold, alpha)
    unknown = set(rows["commit"]) - {base, head}
    if unknown:
        raise ValueError(f"rounds rows of commits {sorted(c[:10] for c in unknown)}, expected only base and head")
    stage = rows["stage"] if "stage" in rows.columns else pd.Series(0, index=rows.index)
    stage = stage.fillna(0).astype(int)
    out = []
    for key, group in rows[stage == 0].groupby(GROUP, sort=False):
        row = _first_verdict(group, key, base, head, threshold, alpha)
        row.update(confirm_ratio=math.nan, confirm_p_value=math.nan, confirm_rounds=0)
        confirm = rows[(stage == 1) & _matches(rows, key)]
        if row["verdict"] == "regression" and len(confirm):
            again = _first_verdict(confirm, key, base, head, threshold, alpha)
            row.update(confirm_ratio=again["ratio"], confirm_p_value=again["p_value"], confirm_rounds=again["rounds"])
            if again["verdict"] != "regression":
                row["verdict"] = "not confirmed"
        out.append(row)
    return finish(out, COLUMNS, base, head)


def _matches(rows: pd.DataFrame, key: tuple) -> pd.Series:
    """Rows of one benchmark x parameters (``key``: the :data:`GROUP` values)."""
    mask = pd.Series(True, index=rows.index)
    for column, value in zip(GROUP, key):
        mask &= rows[column] == value
    return mask


def _first_verdict(group: pd.DataFrame, key: tuple, base: str, head: str, threshold: float, alpha: float) -> dict:
    """The verdict row of one benchmark x parameters from its rounds (one stage)."""
    first = group.iloc[0]
    values = group.assign(value=pd.to_numeric(group["value"], errors="coerce"))
    ok = values[np.isfinite(values["value"]) & (values["value"] > 0)]
    wide = ok.pivot_table(index="round", columns="commit", values="value", aggfunc="first")
    has = {c: c in wide.columns and wide[c].notna().any() for c in (base, head)}
    ran = {c: c in set(group["commit"]) for c in (base, head)}
    row = dict(zip(GROUP, key), type=first["type"], unit=first["unit"])
    row.update(base=math.nan, head=math.nan, ratio=math.nan, ci_low=math.nan, ci_high=math.nan)
    row.update(p_value=math.nan, significant=None, rounds=0, test="")
    if has[base]:
        row["base"] = float(wide[base].median())
    if has[head]:
        row["head"] = float(wide[head].median())
    if not (has[base] and has[head]):
        if not ran[base] or not ran[head]:
            row["verdict"] = "new" if not ran[base] else "removed"
        elif has[base]:
            row["verdict"] = "failed"
        elif has[head]:
            row["verdict"] = "fixed"
        else:
            row["verdict"] = "skipped"
        return row
    paired = wide[[base, head]].dropna()
    ratio, low, high, p = paired_test(paired[base].to_numpy(), paired[head].to_numpy(), alpha)
    n = len(paired)
    row.update(ratio=ratio, ci_low=low, ci_high=high, p_value=p, rounds=n)
    row["test"] = f"paired rounds t-test (n={n})" if n >= MIN_ROUNDS else f"none ({n} paired round(s))"
    row["significant"], row["verdict"] = _verdict(ratio, p, n, threshold, alpha)
    return row
