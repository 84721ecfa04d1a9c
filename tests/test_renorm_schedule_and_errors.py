"""Batch Renormalization (docs/design.md §6): the rmax/dmax schedule, creation by name, and the
error messages for bad input and bad options (helpers in renorm_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bkn.layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule

# Every test that takes ``path`` (conftest.path) runs on the compiled kernels and on the torch Functions.

# -- schedule ---------------------------------------------------------------------------------


def test_schedule_values():
    s = RenormSchedule()
    assert s(0) == (1.0, 0.0)
    assert s(5000) == (1.0, 0.0)
    rmax, dmax = s(25000)
    assert rmax == pytest.approx(1 + 2 * (25000 - 5000) / (40000 - 5000), abs=1e-12)
    assert 1 < rmax < 3 and dmax == 5.0
    rmax, dmax = s(15000)
    assert rmax == pytest.approx(1 + 2 * 10000 / 35000) and dmax == pytest.approx(5 * 10000 / 20000)
    assert s(40000) == (3.0, 5.0)
    assert s(10**7) == (3.0, 5.0)
    # Monotone, continuous ramps.
    values = np.array([s(t) for t in range(0, 50000, 250)])
    assert np.all(np.diff(values, axis=0) >= 0)
    assert np.abs(np.diff(values, axis=0)).max() < 0.07


def test_schedule_scaled_to_a_shorter_run():
    s = RenormSchedule().scaled(4000)  # the paper's 40k steps squeezed into 4k
    assert (s.warmup_steps, s.rmax_steps, s.dmax_steps) == (500, 4000, 2500)
    assert s(500) == (1.0, 0.0) and s(2500)[1] == 5.0 and s(4000) == (3.0, 5.0)
    assert RenormSchedule().scaled(80000, reference_steps=40000).warmup_steps == 10000
    with pytest.raises(ValueError, match="RenormSchedule"):
        RenormSchedule().scaled(0)
    with pytest.raises(ValueError, match="rmax_steps"):
        RenormSchedule(warmup_steps=100, rmax_steps=50)
    with pytest.raises(ValueError, match="rmax_max"):
        RenormSchedule(rmax_max=0.5)


def test_layer_follows_its_schedule_by_training_steps(path):
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 + step, 0.5 * step

    layer = BatchRenorm2d(2, schedule=schedule)
    x = torch.randn(4, 2, 3, 3)
    for _ in range(3):
        layer(x)
    layer.eval()
    layer(x)  # inference does not count as a step
    layer.train()
    layer(x)
    assert seen == [0, 1, 2, 3]
    assert int(layer.num_batches_tracked) == 4
    # The step count survives a state dict round trip: a fresh layer resumes the schedule.
    fresh = BatchRenorm2d(2, schedule=schedule)
    fresh.load_state_dict(layer.state_dict())
    fresh(x)
    assert seen[-1] == 4


def test_default_schedule_is_plain_bn_at_first():
    layer = BatchRenorm2d(3)
    assert isinstance(layer.schedule, RenormSchedule) and layer.current_limits() == (1.0, 0.0)
    assert layer.rmax is None and layer.dmax is None
    with torch.no_grad():
        layer.num_batches_tracked.fill_(40000)
    assert layer.current_limits() == (3.0, 5.0)
    fixed = BatchRenorm2d(3, rmax=3.0, dmax=5.0)
    assert (fixed.rmax, fixed.dmax) == (3.0, 5.0) and "rmax=3.0" in repr(fixed)


def test_create_by_name():
    from bkn import norms

    layer = norms.create("brn", 64, rmax=3.0, dmax=5.0)
    assert isinstance(layer, BatchRenorm2d) and layer.current_limits() == (3.0, 5.0)
    layer = norms.create("brn", 8, spatial_dims=0, schedule=RenormSchedule().scaled(100), group_size=2)
    assert isinstance(layer, BatchRenorm1d) and layer.group_size == 2


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,bad", [(BatchRenorm1d, (4, 3, 2, 2)), (BatchRenorm2d, (4, 3, 5)), (BatchRenorm3d, (4, 3, 2, 2))]
)
def test_wrong_number_of_dims(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected .*-d .* got {len(bad)}-d input"):
        cls(3)(torch.randn(bad))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: expected 4 channels .* got 3 channels"):
        BatchRenorm2d(4)(torch.randn(2, 3, 4, 4))


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: group_size=3 must divide the batch size, got batch size 4"):
        BatchRenorm2d(2, group_size=3)(torch.randn(4, 2, 3, 3))


@pytest.mark.parametrize("shape,group_size", [((1, 3), None), ((4, 3), 1), ((1, 3, 1, 1), None)])
def test_one_value_per_channel_in_training(shape, group_size):
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    layer = cls(3, group_size=group_size)
    message = rf"{cls.__name__}: expected more than 1 value per channel .* got input of shape \({shape[0]}, 3"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(shape))).all()  # inference is fine


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rmax": 2.0}, "give both rmax and dmax"),
        ({"dmax": 2.0}, "give both rmax and dmax"),
        ({"rmax": 0.5, "dmax": 1.0}, "rmax must be >= 1, got 0.5"),
        ({"rmax": 2.0, "dmax": -1.0}, "dmax must be >= 0, got -1.0"),
        ({"rmax": 2.0, "dmax": 1.0, "schedule": RenormSchedule()}, "not both"),
        ({"schedule": 3.0}, "schedule must be a callable"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=rf"BatchRenorm2d: .*{match}"):
        BatchRenorm2d(3, **kwargs)


def test_schedule_returning_bad_bounds_is_reported():
    layer = BatchRenorm2d(3, schedule=lambda step: (0.5, 1.0))
    with pytest.raises(ValueError, match=r"BatchRenorm2d schedule at step 0: rmax must be >= 1"):
        layer(torch.randn(2, 3, 2, 2))
