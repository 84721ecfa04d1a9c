"""bkn.probes.graphs: the refusals that need no GPU (CPU tensors, host syncs named by their line), and on CUDA
(skipped here) a converted ResNet-18 step replayed as a graph equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bkn import methods
from bkn.probes import graphs
from bkn.probes.measure import TrainStep


def _step_with_a_sync(x):
    scale = float(x.abs().sum())  # the host sync the error must name
    return x * scale


def test_cpu_tensors_are_refused_by_name():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(graphs.GraphCaptureError, match=r"not on a CUDA device: parameter weight \(cpu\)") as err:
        graphs.GraphedStep(lambda: model(x), graphs.model_tensors(model, x), what="the linear step")
    assert "the linear step cannot be captured" in str(err.value) and "batch tensor 0 (cpu)" in str(err.value)


def test_a_host_sync_is_named_by_its_line():
    x = torch.randn(5)
    with pytest.raises(graphs.GraphCaptureError, match="synchronises with the host 1 time") as err:
        graphs.find_host_syncs(lambda: _step_with_a_sync(x), "the toy step")
    assert "test_graphs.py" in str(err.value) and "_step_with_a_sync" in str(err.value)
    assert torch.equal(graphs.find_host_syncs(lambda: x * 2), x * 2)  # no sync: the step's result


def test_host_syncs_of_a_converted_step_are_counted_on_the_accelerator_path():
    """The same count the GPU check records per method: 0 for ghost BN (its step never reads a value)."""
    from bkn.probes.dispatch_count import accelerator_path

    torch.manual_seed(0)
    model = methods.get("bn").convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), 2)
    step = TrainStep(model, torch.randn(4, 3, 5, 5), torch.randint(0, 10, (4,)))
    with accelerator_path():
        assert torch.isfinite(graphs.find_host_syncs(step))


def test_warmup_must_allow_both_checks():
    with pytest.raises(ValueError, match="warmup must be >= 2"):
        graphs.GraphedStep(lambda: None, {}, warmup=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["bn", "brn", "bkn-analytic", "bkn-official"])
def test_graphed_resnet18_step_replays_equal_to_eager(name):
    import torchvision

    def make_step(model):
        model = model.cuda().train()
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 3, 64, 64, generator=gen).cuda(), torch.randint(0, 10, (8,), generator=gen).cuda()
        return TrainStep(model, x, y), graphs.model_tensors(model, x, y)

    torch.manual_seed(0)
    model = methods.get(name).convert(torchvision.models.resnet18(num_classes=10), group_size=2)
    result = graphs.compare_with_eager(make_step, model, steps=3)
    assert result["loss_rel"] < 1e-4 and result["state_rel"] < 1e-4, result
