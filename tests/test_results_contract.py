"""The results contract (bkn.probes.results): schemas, their errors, and the torch-free report path."""

from __future__ import annotations

import json
import subprocess
import sys

import analysis_fixtures as af
import pandas as pd
import pytest

from analysis.messages import Messages
from analysis.probes import load_drift
from bkn.probes import results
from bkn.probes.results import DRIFT, SCHEMAS, TRAINING, SchemaError

ROOT = results.ROOT
ENV = {"commit": "abc", "torch": "2.x", "device": "cpu", "threads": 1}

# Exactly how the drift probe wrote its file before schemas had versions (commit d448542):
# these columns, pandas' to_parquet, no schema metadata.
OLD_DRIFT_COLUMNS = [
    "data",
    "network",
    "state",
    "method",
    "batch_size",
    "layer",
    "depth",
    "metric",
    "statistic",
    "seed",
    "value",
    "commit",
    "torch",
    "device",
    "threads",
]


def _python(code: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_importing_the_report_builder_does_not_import_torch():
    run = _python(
        "import sys, analysis.report, analysis.browser, bkn.methods, bkn.probes.results; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.slow  # ~19 s (a report built in a fresh process); the fast twin: the import test above
def test_building_a_report_from_result_files_does_not_import_torch(tmp_path):
    af.write_asv_results(tmp_path / "asv", af.method_benches(), af.method_truth, commits=2, samples=5)
    af.write_probes(tmp_path / "results")
    out = tmp_path / "report.html"
    run = _python(
        "import sys, analysis.report as r\n"
        f"code = r.main(['--asv-results', {str(tmp_path / 'asv')!r}, '--results', {str(tmp_path / 'results')!r},"
        f" '--out', {str(out)!r}, '--repo', {str(tmp_path)!r}, '--quiet'])\n"
        "assert code == 0, code\n"
        "print('torch' in sys.modules)\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "False"
    html = out.read_text()
    assert "<h2>Statistic drift</h2>" in html and "<h2>Training probe</h2>" in html and "badge missing" not in html


@pytest.mark.parametrize("schema", list(SCHEMAS.values()), ids=list(SCHEMAS))
def test_write_then_read_round_trips_with_the_schema_recorded(tmp_path, schema):
    frame = {"drift": af.drift_frame, "training": af.training_frame, "gpu": af.gpu_frame}[schema.name]()
    parquet, meta = schema.write(frame, {"note": "x"}, tmp_path)
    assert parquet == tmp_path / schema.file
    back = schema.read(parquet)
    assert list(back.columns) == list(schema.all_columns)
    pd.testing.assert_frame_equal(back, schema.conform(frame, "frame"))
    assert json.loads(meta.read_text())["schema"] == {"name": schema.name, "version": schema.version}
    assert not list(tmp_path.glob(".*.tmp"))


def test_frame_builds_rows_and_environment_in_schema_order():
    rows = [{c: (1 if t == "int64" else 0.5 if t == "float64" else "a") for c, t in TRAINING.columns.items()}]
    frame = TRAINING.frame(reversed(rows), ENV)
    assert list(frame.columns) == list(TRAINING.all_columns) and frame["threads"].dtype == "int64"
    with pytest.raises(SchemaError, match="column 'epoch' is missing.*a bug: nothing was written"):
        TRAINING.frame([{k: v for k, v in rows[0].items() if k != "epoch"}], ENV)
    with pytest.raises(SchemaError, match="does not hold training schema v4's types.*column 'epoch'"):
        TRAINING.frame([rows[0], {k: v for k, v in rows[0].items() if k != "epoch"}], ENV)
    assert TRAINING.frame([], ENV).empty


def test_missing_column_names_file_column_and_command(tmp_path):
    frame = af.drift_frame().drop(columns=["depth"])
    with pytest.raises(SchemaError) as err:
        DRIFT.write(frame, {}, tmp_path)
    assert "drift results: column 'depth' is missing" in str(err.value) and "nothing was written" in str(err.value)
    assert not (tmp_path / DRIFT.file).exists()


def test_another_schema_version_is_refused_with_the_command(tmp_path):
    import dataclasses

    future = dataclasses.replace(DRIFT, version=DRIFT.version + 1)
    path, _ = future.write(af.drift_frame(), {}, tmp_path)
    with pytest.raises(SchemaError) as err:
        DRIFT.read(path)
    text = str(err.value)
    assert str(path) in text and f"v{DRIFT.version + 1}" in text and "rerun `nox -s accuracy`" in text


def test_a_file_written_before_schemas_names_the_renamed_column(tmp_path):
    old = af.drift_frame().rename(columns={"group_size": "batch_size"})[OLD_DRIFT_COLUMNS]
    path = tmp_path / "drift.parquet"
    old.to_parquet(path, index=False)
    with pytest.raises(SchemaError) as err:
        DRIFT.read(path)
    text = str(err.value)
    assert str(path) in text and "older version of the suite" in text
    assert "column 'group_size' is missing" in text and "'batch_size'" in text
    assert "rerun `nox -s accuracy` to rewrite it" in text

    # The report leaves the section out and shows the same message, naming the command.
    messages = Messages(echo=False)
    (tmp_path / "accuracy").mkdir()
    path.rename(tmp_path / "accuracy" / "drift.parquet")
    loaded = load_drift(tmp_path, messages)
    assert loaded.frame is None and "column 'group_size' is missing" in loaded.problem
    assert any("older version" in m for m in messages)


def test_an_unstamped_file_with_todays_columns_is_still_refused(tmp_path):
    path = tmp_path / "drift.parquet"
    af.drift_frame().to_parquet(path, index=False)
    with pytest.raises(SchemaError, match=r"no schema version recorded\); this code reads drift schema v3"):
        DRIFT.read(path)


def test_corrupt_and_absent_files(tmp_path):
    path, _ = DRIFT.write(af.drift_frame(), {}, tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SchemaError, match="corrupt or truncated parquet file"):
        DRIFT.read(path)
    with pytest.raises(FileNotFoundError, match="nox -s convergence"):
        TRAINING.read(tmp_path / "nothing.parquet")


def test_an_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path, _ = DRIFT.write(af.drift_frame(seed=0), {}, tmp_path)
    before = path.read_bytes()
    import pyarrow.parquet as pq

    def broken(table, where, **kwargs):
        open(where, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(KeyboardInterrupt):
        DRIFT.write(af.drift_frame(seed=1), {}, tmp_path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_environment_records_what_results_need():
    env = results.environment()
    assert set(results.ENVIRONMENT_COLUMNS) <= set(env)
    assert env["device"] == "cpu" and env["threads"] >= 1 and env["torch"]


def test_a_training_file_of_schema_v3_is_refused_naming_the_command(tmp_path):
    """v4 added data, network and evaluation (MNIST-1D, two networks, running vs population statistics); a v3
    file, as the probe wrote it before, must be rewritten."""
    import dataclasses

    assert TRAINING.version == 4
    assert {k: TRAINING.columns[k] for k in ("data", "network", "evaluation")} == dict.fromkeys(
        ("data", "network", "evaluation"), "string"
    )
    new = ("data", "network", "evaluation")
    v3 = dataclasses.replace(TRAINING, version=3, columns={k: v for k, v in TRAINING.columns.items() if k not in new})
    path, _ = v3.write(af.training_frame().drop(columns=list(new)), {}, tmp_path)
    with pytest.raises(SchemaError) as err:
        TRAINING.read(path)
    text = str(err.value)
    assert "holds training schema v3, this code reads training schema v4" in text
    assert "rerun `nox -s convergence`" in text
