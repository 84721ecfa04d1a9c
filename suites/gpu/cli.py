"""``python -m suites.gpu``: the options, the parts in order, and the files written (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tarfile

PARTS = ("bandwidth", "graph", "layer", "network", "tests", "asv")
# Seconds per part on a GPU (their sum is the default budget; --budget scales them all).
BUDGETS = {"bandwidth": 10, "graph": 50, "layer": 130, "network": 90, "tests": 90, "asv": 70}
QUICK_BUDGET = 120.0
LOG, META = "gpu.log", "meta.json"
MAX_COPIES = 8  # the device tool brings back at most 8 files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m suites.gpu",
        description="The GPU check (docs/gpu.md): copy bandwidth, graph replay, the layer table, network steps, "
        "the CUDA tests under sync debug mode, asv's CUDA subset; one tidy file under results/gpu.",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the pipeline on the CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds, float32 only (a pipeline check)")
    p.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole run (default {sum(BUDGETS.values())}; "
        f"{QUICK_BUDGET:.0f} with --quick); the parts' budgets are scaled to it",
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--methods", nargs="*", help="registry methods of the layer table (default: all)")
    p.add_argument("--networks", default="resnet18,cifar-resnet20", help="comma-separated networks of the network part")
    p.add_argument("--threads", type=int, help="torch's CPU thread count (default: torch's own)")
    p.add_argument("--results", type=pathlib.Path, default=pathlib.Path("results"), help="results root")
    p.add_argument("--out", type=pathlib.Path, help="also copy the files written (at most 8) into this folder")
    p.add_argument("--pack", action="store_true", help="fill .gpu/ with what the lent machine needs, then exit")
    p.add_argument("--pythons", nargs="*", help="with --pack: Python versions to fetch wheels for")
    p.add_argument(
        "--import",
        dest="import_from",
        type=pathlib.Path,
        metavar="DIR",
        help="take the files a run brought back (DIR) into results/gpu and .asv/results, then exit",
    )
    return p


def _parts(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise SystemExit(f"--parts: unknown part(s) {', '.join(unknown) or '(none)'}; choose from {','.join(PARTS)}")
    return names


def environment(device) -> dict:
    """The environment record (bkn.probes.results.environment) plus triton, the backend and the packed commit."""
    import torch

    from bkn import kernels
    from bkn.probes.results import environment as base

    from .carry import packed_commit

    env = base(device)
    if env["commit"] == "unknown":  # the lent machine's tree travels without .git
        env["commit"] = packed_commit() or "unknown"
    env["triton"] = kernels.triton_version() or "none"
    env["backend_requested"] = os.environ.get(kernels.ENV_SWITCH, "auto")
    try:
        env["backend"] = kernels.backend_for(torch.empty(0, device=device))
    except ValueError as exc:
        env["backend"] = f"error: {exc}"
    if env["backend"] == "native":
        from bkn.layers import _native

        if not _native.enabled():  # BKN_NATIVE=0 (this script's default): the torch Functions run
            env["backend"] = "torch"
    return env


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.pack:
        from .carry import pack

        pack(args.pythons)
        return 0
    if args.import_from is not None:
        return import_results(args.import_from, args.results)
    parts = _parts(args.parts)
    os.environ.setdefault("BKN_NATIVE", "0")  # no CPU kernel build (a minute of the lease); CUDA never uses it
    import torch

    from bkn import methods
    from bkn.probes.results import GPU

    from . import carry, checks
    from . import parts as measured
    from .run import Run

    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (use --device cpu --quick for the pipeline)")
        return 2
    budget = args.budget or (QUICK_BUDGET if args.quick else float(sum(BUDGETS.values())))
    scale = budget / sum(BUDGETS.values())
    out = GPU.path(args.results).parent
    for stale in ("pytest.log", "asv.log", carry.ASV_ARCHIVE):  # an earlier run's, which --out must not copy
        (out / stale).unlink(missing_ok=True)
    run = Run(budget, out / LOG)
    env = environment(device)
    run.say(
        f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}, backend {env['backend']}, "
        f"commit {env['commit']}, budget {budget:.0f} s{' (quick)' if args.quick else ''}"
    )
    names = args.methods or list(methods.names())
    for name in names:
        methods.get(name)  # ValueError naming the known methods
    quick = args.quick
    rounds, block_s = (3, 0.002) if quick else (7, 0.01)
    stage = measured.QUICK_STAGE_SHAPES if quick else measured.STAGE_SHAPES
    large = measured.QUICK_LARGE_SHAPE if quick else measured.LARGE_SHAPE
    dtypes = ("float32",) if quick else measured.DTYPES
    copy_rates = {}
    env.update(budget_s=budget, quick=quick, parts=parts, argv=sys.argv[1:] if argv is None else argv)
    for name in PARTS:
        part = run.part(name, BUDGETS[name] * scale)
        if name not in parts:
            continue
        run.say(f"-- {name} (until {part.ends_at:.0f} s)")
        try:
            if name == "bandwidth":
                copy_rates = measured.bandwidth(run, part, device, (large,), dtypes, rounds)
            elif name == "graph":
                checks.graph_checks(run, part, device, [n for n in checks.GRAPH_METHODS if n in names], quick)
                checks.launches(run, part, device, [n for n in checks.GRAPH_METHODS if n in names])
            elif name == "layer":
                measured.layers(run, part, device, stage, large, dtypes, names, copy_rates, rounds, block_s)
            elif name == "network":
                speed = [n for n in methods.names(tag="speed") if n in names]
                which = [n.strip() for n in args.networks.split(",") if n.strip()]
                cuda = device.type == "cuda"
                measured.networks(run, part, device, speed, rounds, block_s * 2, quick, graphs=cuda, which=which)
            elif name == "tests":
                if quick:
                    why = "--quick: the CUDA tests skip without a GPU"
                    run.skip("tests", " ".join(checks.cuda_test_files()), why)
                else:
                    checks.cuda_tests(run, part, device, out)
            elif name == "asv":
                if device.type == "cuda":
                    carry.asv_part(run, part, out)
                else:
                    run.skip("asv", "asv", "the asv subset is CUDA rows (this run: --device cpu)")
        except Exception as exc:  # noqa: BLE001 - e.g. a sticky CUDA error: the part is recorded, the rest goes on
            run.fail(name, "(the part)", exc)
        _write(run, env, out, args.out)  # after every part: a run cut short still leaves its rows
    frame = _write(run, env, out, args.out)
    failed = int((frame["status"] == "failed").sum())
    skipped = int((frame["status"] == "skipped").sum())
    run.say(f"wrote {GPU.path(args.results)} ({len(frame)} rows: {failed} failed, {skipped} skipped)")
    if args.out is not None:
        copy_out(out, args.out, run)
    print(summary(frame))
    return 0


def _write(run, env: dict, out: pathlib.Path, copies: pathlib.Path | None):
    """The tidy file and meta.json of the rows so far (atomically), copied into ``copies`` too."""
    from bkn.probes.results import GPU

    env["duration_s"] = run.elapsed()
    frame = GPU.frame([{**r, **{k: env[k] for k in ("triton", "device_name", "backend")}} for r in run.rows], env)
    GPU.write(frame, env, out)
    if copies is not None:
        copies.mkdir(parents=True, exist_ok=True)
        for name in (GPU.file, META, LOG):
            shutil.copy2(out / name, copies / name)
    return frame


def copy_out(folder: pathlib.Path, dest: pathlib.Path, run) -> list[pathlib.Path]:
    """The run's files (tidy file, meta, logs, asv archive) copied into ``dest``, at most :data:`MAX_COPIES`."""
    from .carry import ASV_ARCHIVE

    wanted = ["gpu.parquet", META, LOG, "pytest.log", "asv.log", ASV_ARCHIVE]
    files = [folder / n for n in wanted if (folder / n).is_file()][:MAX_COPIES]
    dest.mkdir(parents=True, exist_ok=True)
    run.say(f"copying {', '.join(f.name for f in files)} into {dest}")
    return [pathlib.Path(shutil.copy2(f, dest / f.name)) for f in files]


def import_results(source: pathlib.Path, results: pathlib.Path) -> int:
    """Check the tidy file that came back (``source/gpu.parquet``) and copy it with its meta and logs into
    ``results/gpu``; unpack the asv archive into the checkout's ``.asv/results``."""
    from bkn.probes.results import GPU, SchemaError

    from .carry import ASV_ARCHIVE, ROOT

    try:
        frame = GPU.read(source / GPU.file)
    except (FileNotFoundError, SchemaError) as exc:
        print(f"error: {exc}")
        return 2
    out = GPU.path(results).parent
    out.mkdir(parents=True, exist_ok=True)
    for name in (GPU.file, META, LOG, "pytest.log", "asv.log"):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    archive = source / ASV_ARCHIVE
    if archive.is_file():
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(".asv/results/")]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(ROOT, members=members, **safe)
        print(f"unpacked {len(members)} asv result file(s) into .asv/results")
    print(f"imported {len(frame)} rows ({frame['device_name'].iloc[0] if len(frame) else '?'}) into {out}")
    return 0


def _mark(value: float, target: float, above: bool = False) -> str:
    if value != value:
        return "-"
    text = f"{value:.3g}"
    if target == target:
        text += "" if (value >= target if above else value <= target) else "!"
    return text


def summary(frame) -> str:
    """The short tables printed last (the device tool's reply carries the end of the output): ratios to torch's
    BN per method (``!``: misses its target), the graph checks, the tests, asv, then what was skipped or failed."""
    lines = []
    for part, columns in (("layer", ["shape", "dtype"]), ("network", ["shape", "mode"])):
        sub = frame[(frame["part"] == part) & (frame["metric"] == "ratio_to_bn")]
        if sub.empty:
            continue
        short = sub[columns].astype(str).replace({"float32": "f32", "bfloat16": "bf16"})
        sub = sub.assign(column=short.agg(" ".join, axis=1))
        cells = sub.assign(cell=[_mark(v, t) for v, t in zip(sub["value"], sub["target"])])
        wide = cells.pivot_table(index="item", columns="column", values="cell", aggfunc="first", sort=False)
        lines.append(f"{part} ratio to torch BN ('!' misses its target):")
        lines.extend("  " + line for line in wide.fillna("-").to_string().splitlines())
    shown = ["host_syncs", "aten_ops_per_norm", "kernels_per_norm", "loss_rel", "state_rel", "fraction_of_copy"]
    checks = frame[frame["metric"].isin(shown)]
    for r in checks.itertuples():
        mark = _mark(r.value, r.target, above=r.metric == "fraction_of_copy")
        lines.append(f"{r.part} {r.item} {r.shape} {r.dtype} {r.metric}: {mark}")
    for r in frame[frame["part"].isin(["tests", "asv"]) & (frame["status"] != "skipped")].itertuples():
        lines.append(f"{r.part} {r.metric}: {r.value:g} ({r.status}) {r.note[:200]}")
    for r in frame[frame["status"] != "ok"].itertuples():
        lines.append(f"{r.status.upper()} {r.part} {r.item} {r.shape} {r.dtype} {r.mode}: {r.note[:160]}")
    return "\n".join(lines)
