"""The drift probe (bkn.probes.drift): what it must show, its bad inputs, its files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from drift_fixtures import synthetic_rows
from torch import nn

from bkn.probes.data import Dataset, load_photos
from bkn.probes.drift import Probe, check_network, methods, setups
from bkn.probes.drift.__main__ import main
from bkn.probes.drift.sweep import check_group_sizes
from bkn.probes.results import DRIFT
from bkn.probes.stats import METRICS, STATISTICS

pytestmark = pytest.mark.usefixtures("one_thread")


def _value(frame, **where) -> pd.Series:
    mask = np.ones(len(frame), bool)
    for key, value in where.items():
        mask &= frame[key].to_numpy() == value
    return frame[mask]


PER_LAYER = {"mean_error", "var_logratio", "kl", "output_discrepancy", "input_mean_drift", "input_var_drift"}
DECOMPOSED = {f"{p}_{k}" for p in ("mean", "var") for k in ("rmse", "bias", "noise", "signed_bias")}


def test_probe_rows_cover_every_method_layer_metric_and_statistic():
    frame = synthetic_rows(
        ["bn", "bkn-official", "bkn-analytic-adaptive", "brn", "gn", "ln", "bn-ema", "brn-ema", "floor"],
        [2, 4],
        steps=2,
        burn_in=2,
        modes=("in-network", "isolation"),
    )
    layers = 8
    inner = frame[frame["layer"] != "output"]
    for method in ("bn", "bkn-official", "bkn-analytic-adaptive", "brn"):
        sub = _value(inner, method=method, mode="in-network")
        assert set(sub["metric"]) == PER_LAYER | DECOMPOSED, method
        assert len(sub) == layers * (len(PER_LAYER) * 2 + len(DECOMPOSED)) * 2, method
        # isolation: every input is the population-mode input, so no input drift is measured
        assert (
            set(_value(inner, method=method, mode="isolation")["metric"])
            == PER_LAYER
            - {
                "input_mean_drift",
                "input_var_drift",
            }
            | DECOMPOSED
        )
    for method in ("bn-ema", "brn-ema"):
        assert set(_value(inner, method=method)["metric"]) == {"mean_error", "var_logratio", "kl", "output_discrepancy"}
    for method in ("gn", "ln"):  # per-sample norms: the output discrepancy and what reaches their input
        assert set(_value(inner, method=method, mode="in-network")["metric"]) == {
            "output_discrepancy",
            "input_mean_drift",
            "input_var_drift",
        }
    assert set(_value(frame, method="floor")["metric"]) == {
        "mean_rmse",
        "mean_bias",
        "mean_noise",
        "mean_signed_bias",
        "var_rmse",
    }
    # end to end on the chain (no classifier): the relative discrepancy of its output, in network only
    output = frame[frame["layer"] == "output"]
    assert set(output["metric"]) == {"logit_discrepancy"} and set(output["mode"]) == {"in-network"}
    assert set(output["method"]) == {"bn", "bkn-official", "bkn-analytic-adaptive", "brn", "bn-ema", "brn-ema"}
    assert (output["depth"] == layers).all()
    key = ["method", "mode", "group_size", "layer", "metric", "statistic", "seed"]
    assert not frame.duplicated(key).any()
    assert frame["value"].notna().all()
    signed = frame["metric"].str.endswith("signed_bias") | (frame["metric"] == "kl")
    assert (frame.loc[~signed, "value"] >= -1e-12).all()


def test_same_seed_same_results_and_methods_share_micro_batches():
    a = synthetic_rows(["bn", "bkn-official"], [2], steps=2, burn_in=2)
    b = synthetic_rows(["bkn-official", "bn"], [2], steps=2, burn_in=2)
    key = ["method", "mode", "group_size", "layer", "metric", "statistic", "seed"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    # depth 0 has no prior: BKN is BN there, on the same micro-batches -> identical values
    depth0 = a[a["depth"] == 0].pivot_table(index=["metric", "statistic"], columns="method", values="value")
    np.testing.assert_allclose(depth0["bn"], depth0["bkn-official"], rtol=1e-6)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_method_is_the_registrys_error_listing_the_known_names(capsys):
    with pytest.raises(ValueError, match=r"unknown method 'bkm'; known methods: bn, bkn-official.*'floor'"):
        methods.resolve(["bn", "bkm"])
    with pytest.raises(ValueError, match=r"unknown method 'bkm-ema'; known methods: bn"):
        methods.resolve(["bkm-ema"])
    with pytest.raises(ValueError, match=r"'gn-ema': gn keeps no running estimates"):
        methods.resolve(["gn-ema"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--methods", "bn,bkm"])
    assert exit_info.value.code == 2
    assert "argument --methods: unknown method 'bkm'; known methods: bn, bkn-official" in capsys.readouterr().err


def test_probe_names_are_registry_methods_and_their_derived_estimators():
    """Every registry method, an "-ema" twin per method with batch statistics, and "floor"; the options
    are the registry's (brn: fixed limits; brn-scheduled only on request)."""
    from bkn import methods as registry

    batch = [m.name for m in registry.resolve(registry.names()) if m.uses_groups]
    single_process = tuple(n for n in registry.names() if n != "syncbn")  # one process: SyncBN is BN
    assert methods.names() == single_process + tuple(f"{m}-ema" for m in batch) + ("floor",)
    with pytest.raises(ValueError, match="'syncbn' pools its statistics over the workers"):
        methods.resolve(["bn", "syncbn"])
    assert "in" not in methods.DEFAULT_METHODS and "in" in methods.FULL_METHODS
    assert not {"brn-scheduled", "brn-scheduled-ema"} & set(methods.FULL_METHODS)
    assert methods.base("brn-ema") is registry.get("brn") and methods.base("floor") is None
    assert dict(registry.get("brn").options) == {"rmax": 3.0, "dmax": 5.0}
    assert [methods.kind(n) for n in ("bkn-official", "bkn-official-ema", "ln", "floor")] == [
        "batch",
        "batch",
        "per_sample",
        "floor",
    ]


def test_group_size_larger_than_the_data_set_is_a_clear_error(capsys, tmp_path):
    small = Dataset(torch.zeros(10, 3, 8, 8), torch.zeros(10, dtype=torch.long), num_classes=2, name="tiny")
    with pytest.raises(
        ValueError,
        match=r"group size 32 needs batches of 32 samples, more than the data "
        r"set 'tiny'",
    ):
        check_group_sizes("tiny", small, [2, 32], batch_size=8)
    with pytest.raises(SystemExit):  # checked before any work: nothing is run, nothing written
        main(["--data", "digits", "--group-sizes", "2,4096", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "more than the data set 'digits' holds (1797 samples)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_network_without_normalization_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="has no normalization layers with batch statistics"):
        check_network(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "plain-cnn")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "imagenet"], "unknown data 'imagenet'"),
        (["--networks", "vgg"], "unknown networks 'vgg'"),
        (["--states", "half-trained"], "unknown state 'half-trained'"),
        (["--modes", "offline"], "unknown mode 'offline'"),
        (["--group-sizes", "0"], "argument --group-sizes: expected integers >= 1, got '0'"),
        (["--group-sizes", "2,4,2"], "argument --group-sizes: 2 given more than once in '2,4,2'"),
        (["--seeds", "x"], "argument --seeds: expected comma-separated integers, got 'x'"),
        (["--seeds", "-1"], "argument --seeds: expected integers >= 0"),
        (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--batch-sizes", "2"], "unrecognized arguments: --batch-sizes"),  # the old flag: group sizes now
        (["--sgd-batch", "16"], "unrecognized arguments: --sgd-batch"),  # the old flag: --batch-size now
    ],
)
def test_other_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_reach_the_config():
    from bkn.probes.drift.__main__ import config_from, parser

    args = parser().parse_args(
        [
            "--methods",
            "bn,brn-scheduled-ema",
            "--group-sizes",
            "2,8",
            "--seeds",
            "3",
            "--batch-size",
            "32",
            "--steps",
            "4",
            "--burn-in",
            "5",
            "--out",
            "x",
        ]
    )
    config = config_from(args)
    assert config.methods == ["bn", "brn-scheduled-ema"] and config.group_sizes == [2, 8]
    assert config.seeds == [3] and (config.batch_size, config.steps, config.burn_in) == (32, 4, 5)
    assert str(args.out) == "x" and args.threads == 1
    full = config_from(parser().parse_args(["--full"]))
    assert full.methods == list(methods.FULL_METHODS) and full.group_sizes == [1, 2, 4, 8, 16, 32, 64]
    default = config_from(parser().parse_args([]))
    assert default.methods == list(methods.DEFAULT_METHODS) and default.batch_size == 16
    assert default.states == ["trained-own"] and default.modes == ["in-network", "isolation"]
    assert default.group_sizes == [1, 2, 4, 16] and default.seeds == [0, 1] and "floor" in default.methods
    assert {"bn", "bkn-official", "bkn-analytic", "brn", "gn", "bn-ema"} <= set(default.methods)
    assert default.setups == [("synthetic", "residual-chain"), ("digits", "cifar-resnet20")]
    assert config_from(parser().parse_args(["--modes", "isolation"])).modes == ["isolation"]


# -- files: schema, atomic writes, interruption -----------------------------------------------

TINY = [
    "--data",
    "synthetic",
    "--methods",
    "bn,bkn-official,gn,bn-ema,floor",
    "--group-sizes",
    "2,4",
    "--seeds",
    "0,1",
    "--steps",
    "2",
    "--burn-in",
    "2",
    "--no-progress",
    "--threads",
    "1",
]


def test_results_file_follows_the_contract(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rmse / floor" in out and str(tmp_path / "drift.parquet") in out
    frame = DRIFT.read(tmp_path / "drift.parquet")  # carries the schema stamp, or read() raises
    assert tuple(frame.columns) == tuple(DRIFT.all_columns)
    assert "group_size" in frame.columns and "batch_size" not in frame.columns
    assert frame["group_size"].dtype == np.int64 and frame["depth"].dtype == np.int64
    assert frame["seed"].dtype == np.int64 and frame["value"].dtype == np.float64
    assert set(frame["metric"]) <= set(METRICS) and set(frame["statistic"]) == set(STATISTICS)
    assert set(frame["method"]) == {"bn", "bkn-official", "gn", "bn-ema", "floor"}
    assert set(frame["data"]) == {"synthetic"} and set(frame["network"]) == {"residual-chain"}
    assert set(frame["state"]) == {"init"} and set(frame["seed"]) == {0, 1}
    assert set(frame["mode"]) == {"in-network", "isolation"}
    assert frame["torch"].eq(torch.__version__).all() and frame["threads"].eq(1).all()
    assert frame["commit"].str.len().gt(0).all() and frame["device"].eq("cpu").all()
    keys = ["data", "network", "state", "mode", "method", "group_size", "layer", "metric", "statistic", "seed"]
    assert not frame.duplicated(keys).any()
    meta = json.loads((tmp_path / "meta.json").read_text())
    for key in ("commit", "torch", "device", "threads", "duration_s", "arguments", "config", "skipped"):
        assert key in meta
    assert meta["arguments"]["group_sizes"] == [2, 4] and meta["rows"] == len(frame)
    assert meta["schema"] == {"name": "drift", "version": DRIFT.version}
    assert meta["config"]["method_of"]["bn-ema"] == {"method": "bn", "norm": "bn"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_run_leaves_earlier_files_alone_fast(tmp_path, monkeypatch, capsys):
    """Fast stand-in of the slow test below: Ctrl-C during the run writes nothing over what is there."""
    (tmp_path / "drift.parquet").write_bytes(b"earlier results")
    (tmp_path / "meta.json").write_text("{}")
    _interrupt_and_check_nothing_written(tmp_path, monkeypatch, capsys)


def _interrupt_and_check_nothing_written(out, monkeypatch, capsys):
    """Ctrl-C in the probe's run: exit status 130, a message, and the files in ``out`` as they were."""
    before = _files(out)

    def interrupted(self, env=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(Probe, "run", interrupted)
    assert main(TINY + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: " in err and "drift.parquet not written" in err and "run the same command again" in err
    assert _files(out) == before
    return before


def _files(out) -> dict:
    """Every file under ``out`` (the results, meta.json, the saved units' shards) and its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_trained_weights_are_cached_and_reused_fast(tmp_path, monkeypatch):
    """Fast stand-in of the slow test below: one method's network, trained for 2 steps, is read back."""
    monkeypatch.setitem(setups.TRAINING, "steps", 2)
    real_load = setups.load_source
    monkeypatch.setattr(setups, "load_source", lambda data, network: real_load(data, network).head(32))
    argv = "--data digits --methods bn --group-sizes 4 --seeds 0 --steps 1 --burn-in 1 --no-progress --threads 1"
    argv = argv.split() + ["--cache", str(tmp_path / "cache"), "--modes", "in-network", "--states", "trained-own"]
    argv += ["--jobs", "1"]  # the monkeypatched training and data do not reach spawned processes
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    first, second = (json.loads((tmp_path / d / "meta.json").read_text())["training"] for d in "ab")
    assert [r["cached"] for r in first] == [False] and [r["cached"] for r in second] == [True]
    a, b = (DRIFT.read(tmp_path / d / "drift.parquet") for d in "ab")
    pd.testing.assert_series_equal(a["value"], b["value"])  # the cached weights give the same results


@pytest.mark.slow
def test_interrupted_run_leaves_the_previous_results_and_no_temporary_file(tmp_path, monkeypatch, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    before = _interrupt_and_check_nothing_written(tmp_path, monkeypatch, capsys)

    # interrupted *while writing* the parquet file: half a file is written, then Ctrl-C
    monkeypatch.undo()
    import pyarrow.parquet as pq

    def half_written(table, where, *args, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", half_written)
    with pytest.raises(KeyboardInterrupt):
        main(TINY + ["--out", str(tmp_path)])
    monkeypatch.undo()
    assert _files(tmp_path) == before
    assert DRIFT.read(tmp_path / "drift.parquet").shape[0] > 0


@pytest.mark.slow
def test_trained_weights_are_cached_and_reused(tmp_path, monkeypatch):
    """Short training runs on a 64-image subset of the digits - the BN network and one per measured method
    (trained-own) - and the second probe run reads them all from the cache."""
    monkeypatch.setitem(setups.TRAINING, "steps", 3)
    real_load = setups.load_source
    monkeypatch.setattr(setups, "load_source", lambda data, network: real_load(data, network).head(64))
    argv = [
        "--data",
        "digits",
        "--methods",
        "bn,bkn-analytic-adaptive,brn-ema",
        "--group-sizes",
        "4",
        "--seeds",
        "0",
        "--steps",
        "1",
        "--burn-in",
        "1",
        "--no-progress",
        "--cache",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--modes",
        "in-network",
        "--states",
        "trained,trained-own",
        "--jobs",
        "1",  # the monkeypatched training and data do not reach spawned processes
    ]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    cached = sorted((tmp_path / "cache" / "accuracy").iterdir())
    # complete files only, no temporary leftovers: BN's network and one per method (brn-ema: brn's)
    assert [p.suffix for p in cached] == [".pt"] * 4
    assert sorted(p.name.split("-digits")[1].split("-seed")[0] for p in cached) == [
        "",  # trained with torch BatchNorm
        "-bkn-analytic-adaptive",
        "-bn",
        "-brn",
    ]
    first = json.loads((tmp_path / "a" / "meta.json").read_text())["training"]
    assert [r["cached"] for r in first] == [False] * 4
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "meta.json").read_text())["training"]
    assert [r["cached"] for r in second] == [True] * 4
    assert [r["cache"] for r in second] == [r["cache"] for r in first]
    a = DRIFT.read(tmp_path / "a" / "drift.parquet")
    b = DRIFT.read(tmp_path / "b" / "drift.parquet")
    pd.testing.assert_series_equal(a["value"], b["value"])  # seeded: identical results
    assert set(a["state"]) == {"trained", "trained-own"}
    inner = a[a["layer"] != "output"]
    assert inner["depth"].max() == 18  # 19 norms in cifar-resnet20
    output = a[a["layer"] == "output"]
    assert set(output["metric"]) == {"agreement", "logit_discrepancy", "accuracy", "accuracy_population"}
    shares = output[output["metric"] != "logit_discrepancy"]["value"]
    assert shares.between(0, 1).all() and (output["value"] >= 0).all()


def test_summary_tables_from_a_known_frame():
    from bkn.probes.drift.summary import bias_noise_table, end_to_end_table, floor_table, real_data_table

    rows = []
    base = dict(network="n", state="init", mode="in-network", group_size=2)
    for seed in (0, 1):
        for layer, depth in (("a", 0), ("b", 1), ("c", 2)):
            for method, scale in (("bn", 1.0), ("brn", 2.0), ("floor", 0.5)):
                for metric in ("mean_rmse", "mean_bias", "mean_noise", "mean_error"):
                    for data in ("digits", "synthetic"):
                        value = scale * (depth + 1) * (1 + seed)
                        statistic = "median" if metric == "mean_error" else "rms"
                        rows.append(
                            dict(base, data=data, method=method, layer=layer, depth=depth, metric=metric)
                            | dict(statistic=statistic, seed=seed, value=value)
                        )
        for method, agreement in (("bn", 0.5 + 0.1 * seed), ("brn", 1.0)):
            rows.append(
                dict(base, data="digits", method=method, layer="output", depth=3, metric="agreement")
                | dict(statistic="overall", seed=seed, value=agreement)
            )
    frame = pd.DataFrame(rows)
    bias_noise = bias_noise_table(frame, sizes=(2,))
    # median over layers (depth 1: 2 x scale x (1 + seed)), mean over seeds (x 1.5)
    assert bias_noise.loc[("n", "init", "in-network", "bn"), ("mean_bias", 2)] == pytest.approx(3.0)
    assert bias_noise.loc[("n", "init", "in-network", "brn"), ("mean_noise", 2)] == pytest.approx(6.0)
    ratio = floor_table(frame)
    assert ratio.loc["bn", ("mean_rmse", 2)] == pytest.approx(2.0)
    assert ratio.loc["brn", ("mean_rmse", 2)] == pytest.approx(4.0)
    real = real_data_table(frame, sizes=(2,))
    assert real.loc[("digits", "n", "init", "brn"), ("mean_error", 2)] == pytest.approx(6.0)
    agreement = end_to_end_table(frame, sizes=(2,))
    assert agreement.loc[("digits", "n", "init", "bn"), 2] == pytest.approx(0.55)
    assert list(agreement.index.get_level_values("method")) == ["bn", "brn"]


# -- the photographs ------------------------------------------------------------------------


def test_load_photos():
    x, y = load_photos(size=16, count=40, seed=3)
    assert x.shape == (40, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert set(y[:20].tolist()) <= {0, 1, 2, 3} and set(y[20:].tolist()) <= {4, 5, 6, 7}
    x2, y2 = load_photos(size=16, count=40, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, load_photos(size=16, count=40, seed=4)[0])
    with pytest.raises(ValueError, match="count must be a positive even int"):
        load_photos(count=3)
    with pytest.raises(ValueError, match="larger than the photographs"):
        load_photos(size=500)
    with pytest.raises(ValueError, match="scale must lie in"):
        load_photos(scale=0.0)


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--full" in text and "bkn-analytic-adaptive" in text and "output_discrepancy" in text
