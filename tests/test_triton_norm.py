"""The Triton kernels of ghost BN, BKN and BRN (bkn/kernels/triton_norm*.py), run in Triton's interpreter.

Each case runs one training step (forward and backward) on the ``triton`` backend and on the
torch reference (``BKN_BACKEND=torch``: the Python Functions of bkn/layers/_function.py and
_renorm_function.py) from the same inputs, and compares every output, gradient and buffer.
The default run holds a representative subset; the broad matrix (dtypes, G, C, layouts, both
sides of the guard) is marked slow.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from triton_interpreter import backend, compile_for_gpu, interpreted_kernels

from bkn import kernels
from bkn.layers import _triton_function
from bkn.layers._function import normalize_with_stats
from bkn.layers._renorm_function import renorm_train
from bkn.layers.renorm import RenormSchedule

pytest.importorskip("triton")


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with interpreted_kernels():
        yield


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in a contiguous, channels_last or sliced (non-contiguous) tensor."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return (
            x.contiguous(memory_format=torch.channels_last)
            if x.dim() == 4
            else x.transpose(0, -1).contiguous().transpose(0, -1)
        )
    big = torch.zeros(x.shape[0], 2 * x.shape[1], *(s + 1 for s in x.shape[2:]), dtype=x.dtype)
    index = (slice(None), slice(None, None, 2)) + tuple(slice(1, None) for _ in x.shape[2:])
    big[index] = x
    return big[index]


def _bkn_step(name, *, dtype, groups, channels, layout="contiguous", guarded=False, gain="float", prior_shape="C",
              momentum=0.1, spatial=(7, 7), batch=8, seed=0, weight=True, guard=100.0):  # fmt: skip
    """One BKN step with a prior from a chain (differentiable), the posterior used downstream."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial)
    x0 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.7).to(dtype)
    x = _layout(x0, layout).requires_grad_()
    pshape = (channels,) if prior_shape == "C" else (groups, channels)
    theta_m = torch.randn(pshape, generator=gen, dtype=dtype).requires_grad_()
    theta_v = torch.randn(pshape, generator=gen, dtype=dtype).requires_grad_()
    # the previous layer's posterior, moved by a transition: functions of parameters
    prior = (theta_m * 0.5 + 0.3, torch.nn.functional.softplus(theta_v) * (1e4 if guarded else 1.0) + 0.1)
    w = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_() if weight else None
    b = torch.randn(channels, generator=gen, dtype=dtype).requires_grad_() if weight else None
    p = {"float": 0.6, "scalar": torch.tensor(0.4, dtype=dtype), "channel": torch.rand(channels, generator=gen)}[gain]
    if isinstance(p, torch.Tensor):
        p = p.to(dtype).requires_grad_()
    rm, rv = torch.randn(channels, generator=gen, dtype=dtype), torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    steps = torch.tensor(3)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    gm, gv = (
        torch.randn(groups, channels, generator=gen, dtype=dtype),
        torch.randn(groups, channels, generator=gen, dtype=dtype),
    )
    with backend(name):
        with kernels.count_launches() as launches:
            y, mean, var, om, ov = normalize_with_stats(
                x, w, b, prior=prior, gain=p, groups=groups, guard=guard, running=(rm, rv, steps, momentum)
            )
            ((y * dy).sum() + (mean * gm).sum() + (var * gv).sum()).backward()
    leaves = [x, w, b, theta_m, theta_v] + ([p] if isinstance(p, torch.Tensor) else [])
    grads = [t.grad for t in leaves if t is not None]
    return [y, mean, var, om, ov, rm, rv, steps, *grads], launches


def _compare(run, tol=None, **kwargs):
    expected, _ = run("torch", **kwargs)
    actual, launches = run("triton", **kwargs)
    assert sum(launches.values()) == 6, launches  # 3 forward, 3 backward
    tol = tol or TOL[kwargs["dtype"]]
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, i
        assert a.shape == e.shape and a.dtype == e.dtype, (i, a.shape, e.shape, a.dtype, e.dtype)
        torch.testing.assert_close(a, e, **tol, msg=lambda m, i=i: f"output {i}: {m}")
    return actual


@pytest.mark.parametrize(
    "dtype,groups,channels,layout,guarded",
    [
        (torch.float64, 2, 3, "contiguous", False),
        (torch.float64, 2, 3, "contiguous", True),
        (torch.float32, 4, 3, "channels_last", False),
        (torch.float32, 1, 5, "sliced", False),
    ],
)
def test_bkn_step_equals_the_torch_reference(dtype, groups, channels, layout, guarded):
    out = _compare(_bkn_step, dtype=dtype, groups=groups, channels=channels, layout=layout, guarded=guarded)
    y, mean, var, om, ov = out[:5]
    # Both sides of the guard reached: dropped, the posterior is exactly the observation.
    assert torch.equal(mean, om) == guarded and torch.equal(var, ov) == guarded


def test_bkn_gain_tensor_per_group_prior_momentum_none_no_guard():
    _compare(
        _bkn_step, dtype=torch.float64, groups=2, channels=3, gain="channel", prior_shape="GC", momentum=None,
        guard=math.inf,
    )  # fmt: skip


@pytest.mark.slow
def test_bkn_scalar_gain_without_affine_3d():
    _compare(_bkn_step, dtype=torch.float64, groups=4, channels=3, gain="scalar", weight=False, spatial=(6,), batch=8)


def test_ghost_bn_and_small_tiles_merge_chunks(monkeypatch):
    """No prior (ghost BN); tiles of 16 values, so each (group, channel) is merged from two chunks of many tiles."""
    monkeypatch.setattr(_triton_function, "CPU_TILE", 16)  # 50 values per block: chunks of 32 and 18, 2 tiles each
    _compare(_ghost_step, dtype=torch.float64, layout="channels_last", shape=(4, 5, 5, 5), groups=2)


def _ghost_step(name, dtype, layout, shape, groups):
    gen = torch.Generator().manual_seed(4)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 40).to(dtype), layout)
    x.requires_grad_()
    w, b = torch.randn(c, dtype=dtype, generator=gen).requires_grad_(), torch.randn(c, dtype=dtype, generator=gen)
    b.requires_grad_()
    rm, rv, steps = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype), torch.tensor(0)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    with backend(name), kernels.count_launches() as launches:
        y, mean, var, _, _ = normalize_with_stats(x, w, b, groups=groups, running=(rm, rv, steps, None))
        (y * dy).sum().backward()
    return [y, mean, var, x.grad, w.grad, b.grad, rm, rv, steps], launches


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_ghost_bn_matrix_small_tiles(monkeypatch, dtype, layout, groups):
    monkeypatch.setattr(_triton_function, "CPU_TILE", 16)
    _compare(_ghost_step, dtype=dtype, layout=layout, shape=(8, 3, 7, 7), groups=groups)


def _brn_step(name, *, dtype, groups, tensor_limits=False, momentum=0.1, layout="contiguous", spatial=(7, 7), seed=1,
              schedule=None, step=5):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    shape = (8, 3, *spatial)
    x = _layout(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype), layout).requires_grad_()
    w, b = torch.randn(3, generator=gen, dtype=dtype).requires_grad_(), torch.randn(3, generator=gen, dtype=dtype)
    b.requires_grad_()
    # running sigma far below the batch's spread and mu far from its mean: both clamps active
    mu = torch.tensor([2.0, 0.0, -0.05], dtype=dtype)
    sigma = torch.tensor([0.3, 1.0, 3.0], dtype=dtype)
    rvar, steps = sigma * sigma, torch.tensor(step)
    rmax, dmax = (torch.tensor(1.5), torch.tensor(0.5)) if tensor_limits else (1.5, 0.5)
    if schedule is not None:  # the limits from the step counter (in the finalize kernel on triton)
        rmax, dmax = schedule, None
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    with backend(name), kernels.count_launches() as launches:
        y, mo, std_b, r, d = renorm_train(x, w, b, mu, sigma, rvar, steps, momentum, rmax, dmax, 1e-5, groups)
        (y * dy).sum().backward()
    return [y, mo, std_b, r, d, x.grad, w.grad, b.grad, mu, sigma, rvar, steps], launches


@pytest.mark.parametrize("groups,tensor_limits,momentum", [(1, False, 0.1), (2, True, None)])
def test_brn_step_equals_the_torch_reference_with_the_clamps_active(groups, tensor_limits, momentum):
    out = _compare(_brn_step, dtype=torch.float64, groups=groups, tensor_limits=tensor_limits, momentum=momentum)
    r, d = out[3], out[4]
    low = torch.tensor(1 / 1.5, dtype=torch.float32 if groups == 2 else torch.float64).to(r.dtype)  # 1 / rmax
    assert (r == 1.5).any() and (r == low).any() and (d.abs() == 0.5).any()  # clamped, both ways
    assert ((r > low) & (r < 1.5)).any()  # and one channel inside the limits


@pytest.mark.parametrize(
    "schedule,step,groups",
    [
        (RenormSchedule(warmup_steps=2, rmax_max=3.0, rmax_steps=12, dmax_max=5.0, dmax_steps=7), 1, 2),  # warm-up
        (RenormSchedule(warmup_steps=2, rmax_max=3.0, rmax_steps=12, dmax_max=5.0, dmax_steps=7), 5, 1),  # ramps
        (RenormSchedule(warmup_steps=2, rmax_max=3.0, rmax_steps=12, dmax_max=0.2, dmax_steps=7), 9, 2),  # d full
        (RenormSchedule(warmup_steps=4, rmax_max=1.2, rmax_steps=4, dmax_max=0.3, dmax_steps=4), 5, 2),  # no ramp
    ],
)
def test_brn_schedule_from_the_counter_equals_the_torch_reference(schedule, step, groups):
    """The scheduled limits computed in the finalize kernel from the counter equal ``on_device``'s (torch path)."""
    out = _compare(_brn_step, dtype=torch.float64, groups=groups, schedule=schedule, step=step)
    r, d, steps = out[3], out[4], out[11]
    rmax, dmax = schedule(step)  # the float schedule at the step before this one is counted
    assert int(steps) == step + 1
    assert r.max() <= rmax * (1 + 1e-6) and r.min() >= (1 / rmax) * (1 - 1e-6) and d.abs().max() <= dmax + 1e-12
    assert torch.isclose(r.max(), torch.tensor(rmax, dtype=r.dtype)) or torch.isclose(
        r.min(), torch.tensor(1 / rmax, dtype=r.dtype)
    )  # a limit that binds: the kernel used this step's rmax


@pytest.mark.parametrize("bad", [-1e-3, math.nan, math.inf, -math.inf, None])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_prior_variance_checked_in_the_finalize_kernel(name, bad):
    """check=label: a negative, infinite or NaN prior variance (in any (group, channel)) is a clear error on both
    backends (on triton from the finalize kernel's flag); a valid one passes and gives the same outputs."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64)
    var = torch.rand(2, 3, generator=gen, dtype=torch.float64) + 0.5
    if bad is not None:
        var[1, 2] = bad
    prior = (torch.zeros(3, dtype=torch.float64), var)
    with backend(name):

        def run():
            return normalize_with_stats(x, None, None, prior=prior, gain=0.5, groups=2, guard=math.inf, check="L")

        if bad is None:
            y = run()[0]
            with backend("torch"):
                torch.testing.assert_close(y, normalize_with_stats(x, None, None, prior=prior, gain=0.5, groups=2)[0])
        else:
            with pytest.raises(ValueError, match="L: expected a finite, non-negative prior variance"):
                run()


def test_bf16_input_statistics_in_float32():
    gen = torch.Generator().manual_seed(7)
    x64 = torch.randn(8, 3, 7, 7, generator=gen, dtype=torch.float64) * 2 + 100  # |mean| >> spread
    x = x64.to(torch.bfloat16)
    dy = torch.randn(x.shape, generator=gen)
    results = {}
    for name in ("torch", "triton"):
        xi = x.clone().requires_grad_()
        w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)  # float32 parameters (autocast)
        with backend(name):
            y, mean, var, _, _ = normalize_with_stats(xi, w, b, groups=2)
            (y.float() * dy).sum().backward()
        results[name] = (y, mean, var, xi.grad, w.grad)
    y, mean, var, dx, dw = results["triton"]
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and mean.dtype == torch.float32
    # independent: the float64 moments of the bf16 values (a bf16 accumulation would be off by ~1e-1)
    xg = x.double().unflatten(0, (2, 4))
    torch.testing.assert_close(mean.double(), xg.mean((1, 3, 4)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), xg.var((1, 3, 4), correction=0), rtol=1e-5, atol=1e-5)
    ref = results["torch"]
    torch.testing.assert_close(mean, ref[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var, ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.float(), ref[0].float(), rtol=1e-2, atol=2e-2)  # bf16 rounding of y
    torch.testing.assert_close(dx.float(), ref[3].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, ref[4], rtol=1e-4, atol=1e-3)


def test_kernels_defined_outside_the_interpreter_refuse_cpu_tensors(monkeypatch):
    from bkn.kernels import triton_norm

    monkeypatch.setattr(triton_norm, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        normalize_with_stats(torch.randn(4, 3, 2, 2), None, None, groups=2)


def test_no_host_sync_and_six_launches():
    from bkn.probes.dispatch_count import count

    x = torch.randn(8, 3, 3, 3, requires_grad=True)
    mp, vp = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    steps = torch.tensor(0)

    def step():
        y, *_ = normalize_with_stats(
            x, None, None, prior=(mp, vp), gain=0.5, groups=2, guard=100.0,
            running=(torch.zeros(3), torch.ones(3), steps, None),
        )  # fmt: skip
        y.square().sum().backward()

    with kernels.count_launches() as launches:
        counter = count(step, stacks=True)
    assert counter.syncs == [], counter.syncs
    assert dict(launches) == {
        "stats_partial": 1, "kalman_finalize": 1, "affine": 1, "grad_partial": 1, "grad_coefficients": 1,
        "input_grad": 1,
    }  # fmt: skip
    assert int(steps) == 1


def test_layout_views_spatial_dims_as_two_strided_dims():
    f = _triton_function._layout
    x = torch.randn(2, 3, 4, 5)
    assert f(x)[1:4] == (1, 20, (60, 20, 0, 1))  # H, W merged
    cl = x.contiguous(memory_format=torch.channels_last)
    assert f(cl)[0] is cl and f(cl)[1:4] == (1, 20, (60, 1, 0, 3))  # H, W merged: stride C
    sliced = x[:, ::2, 1:, ::2]
    assert f(sliced)[0] is sliced and f(sliced)[1:4] == (3, 3, (60, 40, 5, 2))
    five = torch.randn(2, 3, 4, 6, 6)[..., ::2, ::2, ::2]  # three unmergeable spatial dims: a copy
    t, s1, s2, st, groups = f(five)
    assert t.is_contiguous() and torch.equal(t, five) and (s1, s2) == (1, 2 * 3 * 3)
    assert f(torch.randn(2, 3, 4, 5, 6)[..., ::2, :, ::2])[1:4] == (2, 15, (360, 120, 60, 2))  # D; (H W)
    assert f(torch.randn(4, 3))[1:4] == (1, 1, (3, 1, 0, 0))
    # another tensor read in the same view: its own strides if they fit, else a contiguous copy
    _, _, _, _, groups = f(sliced)
    dense = torch.randn(2, 2, 3, 3)
    assert _triton_function._like(dense, groups)[1] == (18, 9, 3, 1)
    odd = torch.randn(2, 2, 3, 6)[..., ::2]
    assert _triton_function._like(odd, groups)[1] == (36, 18, 6, 2)
    cl_groups = f(cl)[4]  # (H W) merged: a tensor whose H, W are not one run is copied
    t, st = _triton_function._like(x[:, :, :, ::2], cl_groups)
    assert t.is_contiguous() and st == (36, 12, 0, 1)


def test_float_parameters_are_passed_exactly():
    for v in (1e-5, 0.1, 1 / 3, 100.0 * 12, -2.5e-7):
        hi, lo = _triton_function._split(v)
        assert float(torch.tensor(hi, dtype=torch.float32)) == hi and abs(hi + lo - v) <= 1e-15 * abs(v)


# -- the broad matrix (slow) ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,groups,channels,layout,guarded",
    list(
        itertools.product(
            (torch.float64, torch.float32), (1, 2, 4), (3, 5), ("contiguous", "channels_last", "sliced"), (False, True)
        )
    ),
)
def test_bkn_matrix(dtype, groups, channels, layout, guarded):
    out = _compare(_bkn_step, dtype=dtype, groups=groups, channels=channels, layout=layout, guarded=guarded)
    assert torch.equal(out[1], out[3]) == guarded


@pytest.mark.slow
@pytest.mark.parametrize("spatial", [(), (9,), (3, 3, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_bkn_other_ranks(spatial, layout):
    _compare(_bkn_step, dtype=torch.float64, groups=2, channels=3, spatial=spatial, layout=layout, gain="channel")


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,groups,tensor_limits,momentum,layout",
    list(itertools.product((torch.float64, torch.float32), (1, 2, 4), (False, True), (0.1, None), ("contiguous",)))
    + [(torch.float32, 2, False, 0.1, "channels_last"), (torch.float64, 1, True, None, "sliced")],
)
def test_brn_matrix(dtype, groups, tensor_limits, momentum, layout):
    _compare(_brn_step, dtype=dtype, groups=groups, tensor_limits=tensor_limits, momentum=momentum, layout=layout)


def _given_moments_step(name, dtype, posterior_only):
    """BKN given its observed moments (as the adaptive gain passes them); or only the posterior used downstream."""
    from bkn.layers._moments import batch_moments

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=dtype).requires_grad_()
    mp = torch.randn(3, generator=gen, dtype=dtype).requires_grad_()
    vp = (torch.rand(3, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    w, b = torch.randn(3, generator=gen, dtype=dtype).requires_grad_(), torch.randn(3, generator=gen, dtype=dtype)
    with torch.no_grad():
        observed = batch_moments(x, 2)
    with backend(name), kernels.count_launches() as launches:
        y, mean, var, om, ov = normalize_with_stats(
            x, w, b, prior=(mp, vp), gain=0.3, observed=None if posterior_only else observed, groups=2, guard=100.0
        )
        loss = (mean * 2).sum() + var.square().sum()
        (loss if posterior_only else loss + y.sin().sum()).backward()
    grads = [t.grad for t in (x, mp, vp, w)]  # w's: zeros where y is unused, as the reference's
    return [y, mean, var, om, ov, *grads], launches


@pytest.mark.parametrize("posterior_only", [False, True])
def test_bkn_given_moments_or_only_the_posterior_used(posterior_only):
    expected, _ = _given_moments_step("torch", torch.float64, posterior_only)
    actual, launches = _given_moments_step("triton", torch.float64, posterior_only)
    # given moments: no partial-moments launch; posterior only: no dy, so no partial-sums launch
    assert sum(launches.values()) == 5 and ("stats_partial" in launches) == posterior_only
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL[torch.float64], msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("groups", [1, 2])
def test_brn_without_affine(groups):
    def step(name, dtype):
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(4, 3, 7, 7, generator=gen, dtype=dtype).requires_grad_()
        mu, sigma = torch.full((3,), 0.5, dtype=dtype), torch.full((3,), 0.4, dtype=dtype)
        rvar, steps = sigma * sigma, torch.tensor(0)
        with backend(name), kernels.count_launches() as launches:
            y, *stats = renorm_train(x, None, None, mu, sigma, rvar, steps, None, 2.0, 1.0, 1e-5, groups)
            y.sin().sum().backward()
        return [y, *stats, x.grad, mu, sigma, rvar, steps], launches

    _compare(step, dtype=torch.float64)


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target():
    """Every kernel of the norms, in every variant of their launches (float32, bfloat16 and float64 inputs; with and
    without prior, tensor or float gain, momentum or 1 / steps, BRN's limits and schedule, weight and bias), goes
    through triton's compiler for CUDA sm_90 (no GPU needed): ``tests/triton_compile.py norm``."""
    out = compile_for_gpu("norm")
    assert out.count("ok ") == 88
    for name in ("stats_partial", "kalman_finalize", "renorm_finalize", "affine", "grad_partial", "grad_coefficients",
                 "input_grad"):  # fmt: skip
        assert f" {name}: " in out
