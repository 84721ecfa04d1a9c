"""The checks of the GPU run: graph replay against eager (with host syncs counted) and the CUDA tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import torch

from .parts import build_network, network_inputs, shape_text, train_step

GRAPH_METHODS = ("bn", "brn", "bkn-analytic", "bkn-official")  # in groups of 2: bn is ghost BN
GRAPH_TOLERANCE = 1e-4  # largest relative difference of a loss, parameter or buffer, replay vs eager
ROOT = pathlib.Path(__file__).resolve().parents[2]
SYNC_DEBUG_OPTION = "--cuda-sync-debug=error"  # tests/conftest.py: steps under torch.cuda.set_sync_debug_mode


def graph_checks(run, part, device, names, quick: bool) -> None:
    """Per method, a converted ResNet-18 step (``quick``: the tiny CIFAR ResNet): host syncs per step (any
    device) and, on CUDA, graph replay against eager from the same state (``bkn.probes.graphs.compare_with_eager``)."""
    from bkn.probes import dispatch_count, graphs

    network = "cifar-resnet20" if quick else "resnet18"
    label = f"{network}-{shape_text(network_inputs(network, quick))}"
    for name in names:
        if part.expired(8.0):
            run.skip("graph", name, part.why(), shape=label, mode="graphed")
            continue
        try:
            torch.manual_seed(0)
            step, _ = train_step(build_network(network, name, quick), network, device, quick)
            path = dispatch_count.accelerator_path() if device.type == "cpu" else contextlib.nullcontext()
            with path, dispatch_count.single_process_group():
                step()  # warm-up: first-call work is not a step's
                counter = dispatch_count.count(step, stacks=True)
            first = counter.syncs[0].splitlines()[-1] if counter.syncs else ""
            where = "the accelerator path (torch Functions) on the CPU" if device.type == "cpu" else "CUDA"
            note = f"counted on {where}" + (f"; first at {first}" if first else "")
            run.add("graph", name, "host_syncs", len(counter.syncs), target=0, note=note, shape=label)
            at = f" (first at {first})" if first else ""
            run.say(f"graph: {name} host syncs per step: {len(counter.syncs)}{at}")
        except Exception as exc:  # noqa: BLE001
            run.fail("graph", name, exc, shape=label)
        if device.type != "cuda":
            why = "CUDA graphs need a CUDA device (this run: --device cpu)"
            run.skip("graph", name, why, shape=label, mode="graphed")
            continue
        try:
            torch.manual_seed(0)
            model = build_network(network, name, quick)
            result = graphs.compare_with_eager(lambda m: train_step(m, network, device, quick), model)
        except graphs.GraphCaptureError as exc:
            run.fail("graph", name, f"capture impossible: {exc}", shape=label, mode="graphed")
            continue
        except Exception as exc:  # noqa: BLE001
            run.fail("graph", name, exc, shape=label, mode="graphed")
            continue
        equal = max(result["loss_rel"], result["state_rel"]) <= GRAPH_TOLERANCE
        status = "ok" if equal else "failed"
        note = f"3 replays vs 3 eager steps after 3 warm-ups; losses eager {result['losses_eager']}"
        for metric in ("loss_rel", "state_rel"):
            value = result[metric]
            run.add("graph", name, metric, value, target=GRAPH_TOLERANCE, status=status, note=note, shape=label)
        diffs = f"loss {result['loss_rel']:.2e}, state {result['state_rel']:.2e}"
        run.say(f"graph: {name} replay vs eager: {diffs} ({status})")


# The bound on launches (aten ops + Triton launches) per norm layer per training step.
LAUNCH_TARGET = {"bn": 8, "brn": 8, "bkn-analytic": 16, "bkn-official": 24}


def launches(run, part, device, names) -> None:
    """Per method: aten ops per norm layer in one training step of the small conv net (``bkn.probes.dispatch_count``;
    on the CPU on the accelerator path), and on CUDA the device kernels per norm layer (torch's profiler: Triton
    launches included). Both net of the same net with its norms replaced by ``nn.Identity``."""
    from bkn.probes import dispatch_count

    for name in names:
        if part.expired(3.0):
            run.skip("graph", name, part.why(), shape="small-net", mode="launches")
            continue
        target = LAUNCH_TARGET.get(name)
        try:
            with dispatch_count.single_process_group():
                ops = dispatch_count.measure_method(name)["ops_per_norm"]
            where = "the accelerator path on the CPU" if device.type == "cpu" else "the CPU's accelerator path"
            note = f"counted on {where}"
            run.add("graph", name, "aten_ops_per_norm", ops, target=target, note=note, shape="small-net")
            if device.type == "cuda":
                kernels = _kernels_per_norm(name, device)
                note = "device kernels per norm layer per step (torch.profiler), Triton's included"
                run.add("graph", name, "kernels_per_norm", kernels, target=target, note=note, shape="small-net")
                run.say(f"graph: {name} aten ops per norm {ops:.1f}, CUDA kernels per norm {kernels:.1f}")
            else:
                run.say(f"graph: {name} aten ops per norm {ops:.1f}")
        except Exception as exc:  # noqa: BLE001
            run.fail("graph", name, exc, shape="small-net", mode="launches")


def _kernels_per_norm(name: str, device) -> float:
    from torch.profiler import ProfilerActivity, profile

    from bkn import methods
    from bkn.probes import dispatch_count

    counts = []
    for identity in (False, True):
        torch.manual_seed(1)
        model = dispatch_count.small_net(identity)
        if not identity:
            model = methods.get(name).convert(model, group_size=2)
        model = model.to(device).train()
        x, target = torch.randn(8, 3, 8, 8, device=device), torch.randint(0, 10, (8,), device=device)

        def step(model=model, x=x, target=target):
            torch.nn.functional.cross_entropy(model(x), target).backward()

        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        counts.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    return (counts[0] - counts[1]) / dispatch_count.NORM_LAYERS


def cuda_test_files() -> list[str]:
    """tests/test_cuda.py and every other test file that marks tests ``cuda``."""
    files = sorted(p for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text(encoding="utf-8"))
    return [str(p.relative_to(ROOT)) for p in files]


def cuda_tests(run, part, device, log_dir: pathlib.Path) -> None:
    """The CUDA-marked tests (not slow) under ``set_sync_debug_mode("error")`` in a pytest subprocess."""
    files = cuda_test_files()
    if part.expired(10.0):
        run.skip("tests", " ".join(files), part.why())
        return
    env = {**os.environ, "BKN_NATIVE": "0", "PYTHONUNBUFFERED": "1"}  # no CPU kernel build on the lent machine
    with tempfile.TemporaryDirectory() as tmp:
        junit = pathlib.Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda and not slow"]
        command += [SYNC_DEBUG_OPTION, f"--junitxml={junit}", *files]
        with contextlib.suppress(ImportError):
            import xdist  # noqa: F401

            if device.type == "cuda":
                command += ["-n", "4"]
        run.say(f"tests: {' '.join(command[1:])}")
        log = log_dir / "pytest.log"
        try:
            with log.open("w", encoding="utf-8") as out:
                code = subprocess.run(
                    command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=max(part.left(), 1)
                ).returncode
        except subprocess.TimeoutExpired:
            run.skip("tests", " ".join(files), f"{part.why()} while pytest ran (its output: {log.name})")
            return
        counts = read_junit(junit)
    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
    if counts is None:
        run.fail("tests", " ".join(files), f"pytest exited {code} without a report: {tail[0]}")
        return
    bad = counts["failed"] + counts["errors"]
    status = "failed" if bad or code not in (0, 5) else "ok"
    note = "; ".join(counts["failing"][:8]) or tail[0]
    for metric in ("passed", "failed", "errors", "skipped"):
        run.add("tests", " ".join(files), metric, counts[metric], status=status, note=note)
    run.say(f"tests: {counts['passed']} passed, {bad} failed or errors, {counts['skipped']} skipped ({status})")


def read_junit(path: pathlib.Path) -> dict | None:
    """Counts (passed, failed, errors, skipped) and failing test ids from a pytest junit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in root.iter("testcase"):
        ident = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failing"].append(ident)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failing"].append(ident)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts
