"""The compiled kernels (bkn/csrc) against the Python autograd Functions.

The Python Functions are checked against independent numpy transcriptions of the spec
in test_kalman*.py and test_renorm*.py (which run every test on both paths); here the
two implementations are compared with each other on random cases, in float64, down to
rounding: outputs, posterior and observed statistics, every gradient, running buffers
and the step counter. Plus the plumbing: the build, the switch, the fallbacks.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bkn import BatchKalmanNorm2d, BatchRenorm2d
from bkn.layers import _function, _native, _renorm_function

F64 = torch.float64


@pytest.fixture
def native():
    module = _native.load()
    if module is None:
        pytest.skip("the compiled kernels are off (BKN_NATIVE=0) or could not be built")
    return module


def test_compiled_kernels_are_built_unless_switched_off():
    """CI has a compiler and ninja: a silent fallback would hide a broken build (and the speed)."""
    if not _native.enabled():
        pytest.skip(f"{_native.ENV_SWITCH}=0")
    assert _native.load() is not None, "bkn/csrc did not build: see the RuntimeWarning"


def test_two_checkouts_share_one_build_instead_of_rebuilding_each_other(tmp_path, monkeypatch):
    """Two clones with the same sources: the second loads the first one's build, no recompile.

    The build files must not name the checkout (torch writes the source paths into
    build.ninja, and a changed build.ninja makes ninja rebuild everything), nor may the
    build's name (a hash of the sources' names and bytes, not of their directory).
    """
    if not _native.enabled():
        pytest.skip(f"{_native.ENV_SWITCH}=0")
    files = _native.source_files()
    assert {f.suffix for f in files} == {".cpp", ".h"}  # headers are hashed and staged too
    built = []
    for clone in ("clone-a", "clone-b", "clone-a"):
        sources = tmp_path / clone / "csrc"
        sources.mkdir(parents=True, exist_ok=True)
        for f in files:
            (sources / f.name).write_bytes(f.read_bytes())
        monkeypatch.setattr(_native, "SOURCE_DIR", sources)
        module = _native.build()
        directory = pathlib.Path(module.__file__).parent
        ninja = directory / "build.ninja"
        library = pathlib.Path(module.__file__)
        built.append((module.__file__, ninja.read_text(), ninja.stat().st_mtime_ns, library.stat().st_mtime_ns))
        assert str(tmp_path) not in ninja.read_text()
    assert len({b[0] for b in built}) == 1  # one build directory for both clones
    assert built[1][1:] == built[0][1:] and built[2][1:] == built[0][1:]  # build.ninja and .so untouched


def test_build_name_covers_every_source_and_header(tmp_path):
    """An edit of any file, a header included, or a file renamed, is a new build name."""
    for f in _native.source_files():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    copies = sorted(tmp_path.iterdir())
    name = _native.build_name(copies, ["-O3"], [])
    assert name == _native.build_name(_native.source_files(), ["-O3"], [])  # the directory is not hashed
    assert name != _native.build_name(copies, ["-O2"], [])
    for f in copies:
        original = f.read_bytes()
        f.write_bytes(original + b"\n")
        assert _native.build_name(copies, ["-O3"], []) != name, f.name
        f.write_bytes(original)
    header = next(f for f in copies if f.suffix == ".h")
    renamed = header.with_name("renamed_" + header.name)
    header.rename(renamed)
    assert _native.build_name(sorted(tmp_path.iterdir()), ["-O3"], []) != name


def test_switch_off_and_build_failure_fall_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setenv(_native.ENV_SWITCH, "0")
    assert _native.load() is None  # switched off: no attempt, no warning

    def broken(verbose=False):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setenv(_native.ENV_SWITCH, "1")
    monkeypatch.setattr(_native, "build", broken)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler here"):
        assert _native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert _native.load() is None
    # The layers still work, on the Python Functions.
    layer = BatchKalmanNorm2d(3)
    y = layer(torch.randn(4, 3, 2, 2), prior=(torch.zeros(3), torch.ones(3)))
    assert torch.isfinite(y).all() and layer.prior_used


def test_tensors_the_compiled_path_does_not_take_go_to_python(native):
    x = torch.randn(4, 3, 2, 2)
    w, b = torch.ones(3), torch.zeros(3)
    args = dict(
        gain_tensor=None,
        gain=0.5,
        obs_mean=None,
        obs_var=None,
        groups=1,
        eps=1e-5,
        guard=100.0,
        running_mean=None,
        running_var=None,
        steps=None,
        momentum=0.1,
    )

    def call(x, w, b, m, v):
        return native.kalman_norm(x, w, b, m, v, *args.values())

    assert len(call(x, w, b, torch.zeros(3), torch.ones(3))) == 5
    assert call(x, w, b, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)) == []  # mixed dtypes
    assert call(x.bfloat16(), w.bfloat16(), b.bfloat16(), torch.zeros(3), torch.ones(3)) == []  # bfloat16
    # ... and the layer gives the Python Function's result for them.
    layer = BatchKalmanNorm2d(3, p=0.5, guard=None)
    prior = (torch.randn(3, dtype=F64), torch.rand(3, dtype=F64) + 0.5)
    y = layer(x, prior=prior)
    ref = _function._NormalizeWithStats.apply(
        x, layer.weight, layer.bias, *prior, 0.5, None, None, 1, 1e-5, math.inf, None
    )[0]
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


# -- Kalman / ghost-batch normalization: compiled vs Python Function --------------------------


@st.composite
def kalman_cases(draw):
    groups = draw(st.integers(1, 3))
    n = groups * draw(st.integers(1, 3))
    c = draw(st.integers(1, 5))
    spatial = draw(st.sampled_from([(), (3,), (2, 3), (2, 1, 3)]))
    if n // groups * math.prod(spatial) < 2:  # at least two values per statistic
        spatial = (2,) + spatial
    prior = draw(st.sampled_from([None, "C", "GC"]))
    gain = draw(st.sampled_from(["float", "scalar", "C", "GC"])) if prior else "none"
    return dict(
        groups=groups,
        shape=(n, c) + spatial,
        prior=prior,
        gain=gain,
        affine=draw(st.booleans()),
        running=draw(st.sampled_from([None, 0.1, "cumulative"])),
        guard=draw(st.sampled_from([math.inf, 100.0, 0.5])),
        observed=draw(st.booleans()),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
        loss_on=draw(st.sampled_from(["y", "posterior", "both"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _kalman_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape, groups = case["shape"], case["groups"]
    c = shape[1]

    def rand(*size, low=None):
        t = (
            torch.rand(size, generator=gen, dtype=F64) + low
            if low is not None
            else torch.randn(size, generator=gen, dtype=F64)
        )
        return t.requires_grad_()

    x = torch.randn(shape, generator=gen, dtype=F64) * 2 + 0.5
    if case["layout"] == "channels_last" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif case["layout"] == "strided":  # neither layout: a view with a gap between samples
        x = torch.cat([x, x], dim=0)[::2]
    x.requires_grad_()
    w, b = (rand(c, low=0.5), rand(c)) if case["affine"] else (None, None)
    prior = None
    if case["prior"]:
        size = (c,) if case["prior"] == "C" else (groups, c)
        prior = (rand(*size), rand(*size, low=0.5))
    gain = {
        "none": None,
        "float": 0.7,
        "scalar": rand(low=0.1).detach().mul(0.8).requires_grad_(),
        "C": rand(c, low=0.0).detach().requires_grad_(),
        "GC": rand(groups, c, low=0.0).detach().requires_grad_(),
    }[case["gain"]]
    observed = None
    if case["observed"]:
        with torch.no_grad():
            observed = _function.batch_moments(x, groups)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    dm, dv = torch.randn(groups, c, generator=gen, dtype=F64), torch.randn(groups, c, generator=gen, dtype=F64)
    return x, w, b, prior, gain, observed, dy, (dm, dv)


def _run_kalman(case, compiled: bool, monkeypatch):
    x, w, b, prior, gain, observed, dy, (dm, dv) = _kalman_inputs(case)
    c = case["shape"][1]
    running = None
    buffers = (torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64), torch.tensor(3))
    if case["running"] is not None:
        running = (*buffers, None if case["running"] == "cumulative" else case["running"])
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(_native, "load", lambda: None)
        y, mean, var, obs_mean, obs_var = _function.normalize_with_stats(
            x,
            w,
            b,
            prior=prior,
            gain=gain,
            observed=observed,
            groups=case["groups"],
            guard=case["guard"],
            running=running,
        )
    loss = 0
    if case["loss_on"] in ("y", "both"):
        loss = loss + (y * dy).sum()
    if case["loss_on"] in ("posterior", "both"):
        loss = loss + (mean * dm).sum() + (var * dv).sum()
    inputs = [t for t in (x, w, b, *(prior or ()), gain) if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return dict(
        y=y.detach(),
        stats=[t.detach() for t in (mean, var, obs_mean, obs_var)],
        grads=grads,
        buffers=[t.clone() for t in buffers],
        x=x,
    )


@given(kalman_cases())
def test_compiled_kalman_equals_python_function(case):
    if _native.load() is None:
        pytest.skip("the compiled kernels are off")
    with pytest.MonkeyPatch.context() as monkeypatch:
        got = _run_kalman(case, True, monkeypatch)
        ref = _run_kalman(case, False, monkeypatch)
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["y"], ref["y"], **close)
    for a, b in zip(got["stats"], ref["stats"]):
        torch.testing.assert_close(a, b, **close)
    for a, b in zip(got["grads"], ref["grads"]):
        # Where the guard drops the prior the compiled path (host-side guard) gives the prior and
        # gain no gradient, the Python one (guard on the device, no host sync) zeros: the same numbers.
        if a is None and b is not None:
            a = torch.zeros_like(b)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, **close)
    for a, b in zip(got["buffers"], ref["buffers"]):
        torch.testing.assert_close(a, b, **close)
    x = got["x"]
    for fmt in (torch.channels_last, torch.channels_last_3d):  # outputs keep the input's layout
        if (
            x.dim() == {torch.channels_last: 4, torch.channels_last_3d: 5}[fmt]
            and x.is_contiguous(memory_format=fmt)
            and not x.is_contiguous()
        ):
            assert got["y"].is_contiguous(memory_format=fmt)
            assert got["grads"][0] is None or got["grads"][0].is_contiguous(memory_format=fmt)


def test_compiled_kalman_counts_steps_and_averages_cumulatively(native):
    """momentum=None: factor 1 / num_batches_tracked after counting the step, as torch's BN."""
    layer, bn = BatchKalmanNorm2d(3, momentum=None, group_size=2), torch.nn.BatchNorm2d(3, momentum=None)
    for step in range(1, 4):
        x = torch.randn(4, 3, 2, 2) * step
        layer(x, prior=(torch.zeros(3), torch.ones(3)))
        assert int(layer.num_batches_tracked) == step
    assert torch.isfinite(layer.running_var).all()
    # p=0 grouped (the compiled Function without prior) and BN agree on one group of 4.
    g, b = BatchKalmanNorm2d(3, p=0.0, momentum=None), bn
    for step in range(3):
        x = torch.randn(4, 3, 2, 2) + step
        g(x), b(x)
    torch.testing.assert_close(g.running_mean, b.running_mean)
    torch.testing.assert_close(g.running_var, b.running_var)


# -- Batch Renormalization: compiled vs Python Function ---------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_renorm_equals_python_function(native, momentum, affine, channels_last):
    def run(compiled: bool):
        gen = torch.Generator().manual_seed(5)
        layer = BatchRenorm2d(4, rmax=1.5, dmax=0.5, momentum=momentum, affine=affine).double()
        load = _native.load
        if not compiled:
            _native.load = lambda: None
        try:
            grads, stats = [], []
            for step in range(3):  # running estimates move, so r and d clip differently each step
                x = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64) * (1 + step) + step
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                y = layer(x)
                y.backward(torch.randn(x.shape, generator=gen, dtype=F64))
                grads.append(x.grad)
                stats.append((y.detach(), *layer.last_rd, *layer.last_stats))
        finally:
            _native.load = load
        params = [] if not affine else [layer.weight.grad, layer.bias.grad]
        return grads, stats, params, [t.clone() for t in layer.buffers()]

    got, ref = run(True), run(False)
    for a, b in zip(got[0] + got[2] + got[3], ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(got[1], ref[1]):
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-10)
    if channels_last:
        assert got[0][0].is_contiguous(memory_format=torch.channels_last)


def test_compiled_path_is_used_for_float_cpu_layers(native, monkeypatch):
    """The layers reach the compiled kernels (not only the functional entry point)."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(native, name)(*args)

            return call

    monkeypatch.setattr(_native, "load", lambda: Spy())
    BatchKalmanNorm2d(3)(torch.randn(4, 3, 2, 2), prior=(torch.zeros(3), torch.ones(3))).sum().backward()
    BatchRenorm2d(3, rmax=2.0, dmax=1.0)(torch.randn(4, 3, 2, 2)).sum().backward()
    assert calls == ["kalman_norm", "renorm"]
    # Without the compiled kernels the layers fall back to the Python Functions.
    monkeypatch.setattr(_native, "load", lambda: None)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    y_kalman = BatchKalmanNorm2d(3)(x, prior=(torch.zeros(3), torch.ones(3)))
    y_renorm = BatchRenorm2d(3, rmax=2.0, dmax=1.0)(x)
    assert isinstance(y_kalman.grad_fn, _function._NormalizeWithStats._backward_cls)
    assert isinstance(y_renorm.grad_fn, _renorm_function.Renorm._backward_cls)


@pytest.mark.skipif(os.environ.get(_native.ENV_SWITCH, "1") == "0", reason="compiled kernels off")
def test_threads_do_not_change_results(native):
    """The fused loops split work by (group, channel): results are bitwise the same at 1 and 2 threads."""
    x = torch.randn(8, 16, 9, 9, dtype=F64, requires_grad=True)
    prior = (torch.randn(16, dtype=F64), torch.rand(16, dtype=F64) + 0.5)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            layer = BatchKalmanNorm2d(16, group_size=2, dtype=F64)
            y = layer(x, prior=prior)
            (gx,) = torch.autograd.grad((y * y).sum(), x)
            outs.append((y.detach(), gx))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.slow
def test_demo_ratios_are_medians_over_rounds_and_it_runs(capsys):
    from bkn.probes import demo

    samples = {"bn": [1.0, 2.0, 4.0], "bkn": [1.5, 2.0, 2.0]}
    assert demo.ratio_summary(samples, "bkn", "bn")[0] == pytest.approx(1.0)  # ratios 1.5, 1.0, 0.5
    calls = {"a": 0, "b": 0}
    out = demo.interleaved(
        {"a": lambda: calls.__setitem__("a", calls["a"] + 1), "b": lambda: calls.__setitem__("b", calls["b"] + 1)},
        0.01,
        rounds=3,
    )
    assert [len(v) for v in out.values()] == [3, 3] and calls["a"] > 3 and calls["b"] > 3
    threads = torch.get_num_threads()
    try:
        demo.main(["--min-run-time", "0.02", "--rounds", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "(2, 512, 7, 7)" in text and "BKN/BN" in text and "kernels:" in text and "bkn-official" in text


def test_demo_ratios_are_medians_over_rounds_and_rounds_interleave():
    """The fast stand-in for the test above (slow: it times the demo's layers and networks): its ratio and
    interleaved timing on calls that cost nothing."""
    from bkn.probes import demo

    samples = {"bn": [1.0, 2.0, 4.0], "bkn": [1.5, 2.0, 2.0]}
    assert demo.ratio_summary(samples, "bkn", "bn")[0] == pytest.approx(1.0)  # ratios 1.5, 1.0, 0.5
    order = []
    out = demo.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 0.005, rounds=2)
    assert [len(v) for v in out.values()] == [2, 2] and all(t > 0 for v in out.values() for t in v)
    timed = order[5:]  # after the warm-up (a, b) and the calibration (a 3 times): a..., b..., a..., b... (2 rounds)
    assert sum(x != y for x, y in zip(timed, timed[1:])) == 3 and timed.count("a") > 2 and timed.count("b") > 2


def test_kernels_command_reports_ready_or_switched_off(capsys, monkeypatch):
    from bkn.kernels import __main__ as kernels

    if _native.load() is not None:
        assert kernels.main([]) == 0
        assert "compiled kernels ready" in capsys.readouterr().out
    monkeypatch.setenv(_native.ENV_SWITCH, "0")
    assert kernels.main([]) == 0
    assert "switched off" in capsys.readouterr().out

    def broken(verbose=False):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv(_native.ENV_SWITCH, "1")
    monkeypatch.setattr(_native, "build", broken)
    assert kernels.main([]) == 1
    assert "no compiler here" in capsys.readouterr().err
