"""Your model, your data: ``--model`` / ``--data`` of both probes (:mod:`bkn.probes.sources`), on image folders and a
torchvision data set layout that the tests write themselves (nothing is downloaded).

* keys: a spec with its options round-trips through the key, and the report's short label;
* every error a user can run into names what was expected: a missing path, a file for a folder, an empty folder,
  class folders without images, one class, an undecodable image, a torchvision data set missing under its root,
  an unknown data set, a malformed spec, an unknown timm / torchvision model, a model without BatchNorm, a model
  whose outputs do not fit the classes;
* the decoded data against a direct computation: constant-colour images, so each standardised pixel is
  ``(colour - mean) / std`` with the channel mean and standard deviation in closed form; split folders, the
  stratified split, ``--classes``, ``--max-images``; a fake MNIST under ROOT read as RGB;
* the command lines resolve a user setup (data key, model, output under ``results/yours/<run>/``), both probes run
  end to end on a tiny ``package.module:callable`` network (fast) and on ``timm:resnet18`` (slow), and the report
  loads those results beside the built-in ones.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bkn.probes import sources

COLOURS = {"ants": (200, 40, 90), "bees": (30, 160, 10), "cats": (90, 90, 250)}


def write_folder(root: pathlib.Path, per_class: int = 5, classes=("ants", "bees"), size=(20, 24)) -> pathlib.Path:
    """``root/<class>/<i>.png``: constant-colour images, one colour per class (``COLOURS``)."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((*size, 3), COLOURS[name], np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny_net(num_classes: int = 10) -> nn.Module:
    """A conv-BN-ReLU net with a head (``package.module:callable`` in the tests: this module's name)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def no_head(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def key_of(path, size=16, **options) -> str:
    return sources.data_key(f"imagefolder:{path}", size, **options)


# -- keys ----------------------------------------------------------------------------------------------


def test_a_key_round_trips_and_labels_short(tmp_path):
    key = key_of(tmp_path / "pets", 32, classes=3, max_images=100)
    spec = sources.parse_key(key)
    assert (spec.kind, spec.location, spec.size, spec.classes, spec.max_images) == (
        "imagefolder",
        str((tmp_path / "pets").resolve()),
        32,
        3,
        100,
    )
    assert spec.key == key and sources.is_data_key(key) and not sources.is_data_key("digits")
    assert sources.label(key) == "imagefolder:pets (32 px, 3 classes)"
    assert sources.label("mnist1d") == "mnist1d"
    key = sources.data_key(f"torchvision-dataset:CIFAR10:{tmp_path}", 32)
    assert sources.label(key) == "torchvision-dataset:CIFAR10 (32 px)"
    assert sources.parse_key(sources.data_key("digits", 16)).kind == "digits"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("folder:/x", "expected imagefolder:PATH, torchvision-dataset:NAME:ROOT"),
        ("imagefolder:", "expected imagefolder:PATH"),
        ("torchvision-dataset:CIFAR10", "torchvision-dataset:NAME:ROOT"),
        ("mnist1d", "or one of digits, photos"),
    ],
)
def test_a_malformed_data_spec_names_the_forms(spec, message):
    with pytest.raises(ValueError, match=message):
        sources.data_key(spec, 32)


# -- data errors ---------------------------------------------------------------------------------------


def test_data_errors_name_what_was_expected(tmp_path):
    cases = {
        key_of(tmp_path / "missing"): "no such folder \\(expected a folder with one sub-folder of images per class",
        key_of(write_folder(tmp_path / "one", classes=("ants",))): "1 class\\(es\\) \\(ants\\); a classifier needs",
        key_of((tmp_path / "empty").mkdir() or tmp_path / "empty"): "no class folders",
    }
    (tmp_path / "a file").write_text("x")
    cases[key_of(tmp_path / "a file")] = "not a folder"
    (tmp_path / "noimages" / "ants").mkdir(parents=True)
    (tmp_path / "noimages" / "bees").mkdir()
    (tmp_path / "noimages" / "ants" / "notes.txt").write_text("x")
    cases[key_of(tmp_path / "noimages")] = "no images in its class folders .*expected files ending in .*\\.png"
    cases[key_of(write_folder(tmp_path / "two"), classes=3)] = "--classes 3: .* has only 2 class folders"
    for key, message in cases.items():
        with pytest.raises(ValueError, match=message):
            sources.check_data(key)


def test_an_undecodable_image_names_its_file(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "bees" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read or decode this image"):
        sources.load(key_of(root), workers=0)


def test_a_torchvision_dataset_is_never_downloaded(tmp_path):
    with pytest.raises(ValueError, match="MNIST's files are not under .*never download.*download=True"):
        sources.check_data(sources.data_key(f"torchvision-dataset:MNIST:{tmp_path}", 28))
    assert not any(tmp_path.rglob("*.gz")), "nothing may be fetched"
    with pytest.raises(ValueError, match="torchvision.datasets has no data set 'Cifar10'; known: .*CIFAR10"):
        sources.check_data(sources.data_key(f"torchvision-dataset:Cifar10:{tmp_path}", 28))
    with pytest.raises(ValueError, match="no such folder"):
        sources.check_data(sources.data_key(f"torchvision-dataset:MNIST:{tmp_path / 'nowhere'}", 28))


# -- model errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("timm:resnet1888", "timm has no model 'resnet1888' \\(close: resnet18.*timm.list_models"),
        ("torchvision:resnet", "torchvision has no model 'resnet'.*torchvision.models.list_models\\(\\)"),
        ("torch.nn:Identity", "has no BatchNorm layer, so there is nothing to compare"),
        ("no_such_package_xyz:make", "cannot import module 'no_such_package_xyz'"),
        ("torch.nn:Linear", "calling it failed .*taking num_classes"),
        ("test_user_probes:no_head", "returns \\(2, 4\\) for 2 images, expected logits of shape \\(2, 3\\)"),
        ("test_user_probes:nothing_here", "has no callable 'nothing_here'"),
        ("resnet18", "expected timm:NAME, torchvision:NAME or package.module:callable"),
    ],
)
def test_model_errors_name_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        sources.build_model(spec, 3, 16)


def test_models_are_built_with_the_classes_and_unpretrained():
    for spec in ("timm:resnet18", "torchvision:resnet18", "torchvision.models:resnet18", "test_user_probes:tiny_net"):
        model = sources.build_model(spec, 3, 32)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3), spec
    torch.manual_seed(0)
    a = sources.build_model("timm:resnet18", 3, check=False)
    torch.manual_seed(1)
    b = sources.build_model("timm:resnet18", 3, check=False)
    assert not torch.equal(a.conv1.weight, b.conv1.weight)  # seeded initialisation, no downloaded weights


# -- decoded data against a direct computation --------------------------------------------------------


def test_images_are_decoded_resized_and_standardised(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=4, classes=("ants", "bees"))
    data = sources.load(key_of(root, 8), workers=0)
    assert data.images.shape == (8, 3, 8, 8) and data.num_classes == 2
    assert data.labels.tolist() == [0] * 4 + [1] * 4  # ImageFolder's order: sorted classes, sorted files
    colours = torch.tensor([COLOURS["ants"], COLOURS["bees"]], dtype=torch.float64) / 255
    count = 8 * 8 * 8  # values per channel: half of each colour
    mean = colours.mean(0)
    std = (colours - mean).abs()[0] * (count / (count - 1)) ** 0.5  # unbiased, as torch.std
    expected = (colours - mean) / std  # (class, channel)
    got = data.images.to(torch.float64).mean((2, 3))
    torch.testing.assert_close(got, expected[data.labels], atol=1e-4, rtol=0)
    torch.testing.assert_close(data.images.std((2, 3)), torch.zeros(8, 3), atol=1e-5, rtol=0)  # constant images
    with pytest.raises(ValueError, match="reading the images failed|cannot read"):  # the workers' path, same error
        (root / "ants" / "bad.png").write_bytes(b"xx")
        sources.load(key_of(root, 8), workers=1)


def test_split_folders_classes_and_max_images(tmp_path):
    whole = write_folder(tmp_path / "whole", per_class=10, classes=("ants", "bees", "cats"))
    train, test = sources.load_splits(key_of(whole, 8), workers=0)
    assert (len(train), len(test)) == (24, 6)
    assert train.labels.bincount().tolist() == [8, 8, 8] and test.labels.bincount().tolist() == [2, 2, 2]
    train, test = sources.load_splits(key_of(whole, 8, classes=2, max_images=12), workers=0)
    assert train.num_classes == 2 and set(train.labels.tolist()) | set(test.labels.tolist()) == {0, 1}
    assert len(train) + len(test) == 12
    split = tmp_path / "split"
    write_folder(split / "train", per_class=3)
    write_folder(split / "val", per_class=2)
    train, test = sources.load_splits(key_of(split, 8), workers=0)
    assert (len(train), len(test)) == (6, 4)
    assert len(sources.load(key_of(split, 8), workers=0)) == 6  # the drift probe: the train split
    assert sources.num_classes(key_of(split, 8)) == 2


def _idx(path: pathlib.Path, array: np.ndarray) -> None:
    """An IDX file (MNIST's format): magic 0, 0, 8 (uint8), ndim; big-endian int32 dims; the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_a_torchvision_dataset_under_its_root_is_read_as_rgb(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 12), ("t10k", 6)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 3)
    key = sources.data_key(f"torchvision-dataset:MNIST:{tmp_path}", 16, classes=3)
    train, test = sources.load_splits(key, workers=0)
    assert train.images.shape == (12, 3, 16, 16) and len(test) == 6 and train.num_classes == 3
    torch.testing.assert_close(train.images[:, 0], train.images[:, 2])  # grey repeated to RGB
    assert train.labels.tolist() == [i % 3 for i in range(12)]


# -- the command lines and the report ------------------------------------------------------------------


def test_the_drift_command_line_resolves_your_setup(tmp_path):
    from bkn.probes.drift.__main__ import config_from, parser

    root = write_folder(tmp_path / "pets")
    args = parser().parse_args(["--model", "test_user_probes:tiny_net", "--data", f"imagefolder:{root}"])
    config = config_from(args)
    key = key_of(root, 32)
    assert config.setups == [(key, "test_user_probes:tiny_net")]
    assert args.out == pathlib.Path("results/yours/imagefolder_pets__32_px-test_user_probes_tiny_net/accuracy")
    config.validate()
    args = parser().parse_args(["--model", "timm:nope_net", "--data", f"imagefolder:{root}", "--out", "x"])
    with pytest.raises(ValueError, match="timm has no model 'nope_net'"):
        config_from(args)


def test_the_training_command_line_resolves_your_setup(tmp_path):
    from bkn.probes.training.__main__ import parser, resolve

    root = write_folder(tmp_path / "pets")
    args = resolve(parser().parse_args(["--model", "timm:resnet18", "--data", f"imagefolder:{root}", "--classes", "2"]))
    assert args.data == key_of(root, 32, classes=2) and args.networks == ("timm:resnet18",)
    assert (args.epochs, args.seeds, args.group_sizes) == (3, (0,), (2, 32))
    assert args.out.parts[:2] == ("results", "yours") and args.out.name == "convergence"
    args = parser().parse_args(["--data", f"imagefolder:{tmp_path / 'nowhere'}"])
    with pytest.raises(ValueError, match="no such folder"):
        resolve(args)


def _drift_argv(root, out, model, size):
    return [
        "--model", model, "--data", f"imagefolder:{root}", "--image-size", str(size), "--states", "init",
        "--methods", "bn,bkn-official,gn", "--group-sizes", "2", "--seeds", "0", "--burn-in", "2", "--steps", "2",
        "--batch-size", "8", "--out", str(out), "--no-progress", "--jobs", "1", "--workers", "0",
    ]  # fmt: skip


def _training_argv(root, out, model, size):
    return [
        "--model", model, "--data", f"imagefolder:{root}", "--image-size", str(size), "--methods", "bn,gn",
        "--group-sizes", "2", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress",
        "--jobs", "1", "--threads", "1", "--workers", "0",
    ]  # fmt: skip


def _both_probes(tmp_path, model, size):
    from bkn.probes.drift.__main__ import main as drift
    from bkn.probes.results import DRIFT, TRAINING
    from bkn.probes.training.__main__ import main as training

    root = write_folder(tmp_path / "pets", per_class=8)
    results = tmp_path / "results"
    assert drift(_drift_argv(root, results / "yours" / "pets" / "accuracy", model, size)) == 0
    assert training(_training_argv(root, results / "yours" / "pets" / "convergence", model, size)) == 0
    frame = DRIFT.read(results / "yours" / "pets" / "accuracy" / "drift.parquet")
    key = key_of(root, size)
    assert set(frame["data"]) == {key} and set(frame["network"]) == {model}
    assert set(frame["method"]) == {"bn", "bkn-official", "gn"}
    output = frame[frame["layer"] == "output"]
    assert len(output) and output["value"].notna().all()
    # NaN only where a layer's output is 0 in state init (timm zero-initialises each block's last BN weight): 0 / 0
    assert set(frame[frame["value"].isna()]["metric"]) <= {"output_discrepancy"}
    runs = TRAINING.read(results / "yours" / "pets" / "convergence" / "convergence.parquet")
    assert set(runs["data"]) == {key} and set(runs["method"]) == {"bn", "gn"}
    acc = runs[runs["metric"] == "test_acc"]["value"]
    assert acc.between(0, 1).all() and len(acc) >= 2
    return results, key


def test_both_probes_run_on_your_callable_and_a_generated_folder(tmp_path):
    _both_probes(tmp_path, "test_user_probes:tiny_net", 16)


def _report(results, key: str, model: str, size: int):
    """The drift and training sections on ``results`` (yours under results/yours/, a built-in drift run beside)."""
    from analysis.messages import Messages
    from analysis.probes import load_drift, load_training
    from analysis.sections import Inputs, build
    from bkn.probes.results import DRIFT, environment

    built_in = DRIFT.read(results / "yours" / "pets" / "accuracy" / "drift.parquet")
    DRIFT.write(built_in.assign(data="digits", network="cifar-resnet20"), environment(), results / "accuracy")
    messages = Messages(echo=False)
    drift, training = load_drift(results, messages), load_training(results, messages)
    assert set(drift.frame["data"]) == {"digits", key} and len(drift.yours) == 1
    assert training.frame is not None and set(training.frame["data"]) == {key}
    sections = build(Inputs(asv=None, drift=drift, training=training, messages=messages), ["drift", "training"])
    assert [section.status for section in sections] == ["ok", "ok"]
    text = "".join(str(block) for section in sections for block in section.blocks)
    short = f"imagefolder:pets ({size} px)"
    assert short in text and "digits" in text and "Your model and data" in text
    panels = set(sections[0].data["drift_end_to_end"]["panel"])  # one facet per setup: yours beside the built-in
    assert panels == {"digits · cifar-resnet20 · init", f"{short} · {model} · init"}
    assert set(sections[1].data["training_final"]["data"]) == {short}


def test_the_report_adds_your_runs_beside_the_built_in_ones(tmp_path):
    from analysis.messages import Messages
    from analysis.probes import load_drift
    from analysis.sections.drift import _tidy
    from bkn.probes.results import DRIFT, environment

    row = dict(state="init", method="bn", group_size=2, mode="in-network", layer="output", depth=3)
    row.update(metric="agreement", statistic="overall", seed=0, value=0.5)
    key = key_of(tmp_path / "pets", 32)
    DRIFT.write(
        DRIFT.frame([{**row, "data": "digits", "network": "cifar-resnet20"}], environment()),
        {},
        tmp_path / "r" / "accuracy",
    )
    DRIFT.write(
        DRIFT.frame([{**row, "data": key, "network": "timm:resnet18"}], environment()),
        {},
        tmp_path / "r" / "yours" / "a" / "accuracy",
    )
    (tmp_path / "r" / "yours" / "b" / "accuracy").mkdir(parents=True)
    (tmp_path / "r" / "yours" / "b" / "accuracy" / "drift.parquet").write_bytes(b"corrupt")
    messages = Messages(echo=False)
    drift = load_drift(tmp_path / "r", messages)
    assert list(drift.frame["data"]) == ["digits", key] and [p.parts[-3] for p in drift.yours] == ["a"]
    assert any("corrupt" in w and "left out of the report" in w for w in messages.warnings)
    assert set(_tidy(drift.frame)["panel"]) == {
        "digits · cifar-resnet20 · init",
        "imagefolder:pets (32 px) · timm:resnet18 · init",
    }


@pytest.mark.slow
def test_both_probes_run_on_timm_resnet18_and_the_report_shows_them(tmp_path):
    results, key = _both_probes(tmp_path, "timm:resnet18", 32)
    _report(results, key, "timm:resnet18", 32)


def _load_in_a_pool_worker(key: str) -> int:
    return len(sources.load(key, workers=2))


def test_a_process_pools_worker_loads_without_dataloader_workers(tmp_path):
    import multiprocessing

    key = key_of(write_folder(tmp_path / "pets"), 8)
    with multiprocessing.get_context("fork").Pool(1) as pool:  # daemonic: may not start DataLoader workers
        assert pool.apply(_load_in_a_pool_worker, (key,)) == 10


@pytest.mark.parametrize("method", ["bn", "bkn-official", "gn-ws", "mabn", "cbn"])
def test_your_model_is_converted_per_method_once(method):
    import bkn
    from bkn.probes.training.runs import TrainConfig, make_model

    config = TrainConfig(
        method=method, group_size=2, batch_size=8, data="digits#size=16", network="test_user_probes:tiny_net"
    )
    model = make_model(config, 3, 3, 10)
    model(torch.randn(8, 3, 16, 16)).sum().backward()
    norms = {"bn": "GhostBatchNorm2d", "bkn-official": "BatchKalmanNorm2d", "gn-ws": "GroupNorm"}
    norms.update(mabn="MovingAverageBatchNorm2d", cbn="CrossIterationBatchNorm2d")
    assert type(model[1]).__name__.startswith(norms[method])
    if method == "bn":
        assert model[1].group_size == 2  # ghost batches of 2, not torch's BN over the batch
    if method in ("mabn", "cbn"):  # the listing of bkn.convert, not overwritten by a second pass
        kinds = [row.role for row in bkn.conversion_report(model).replaced]
        assert kinds.count("norm") == 2 and kinds.count("conv") == (2 if method == "mabn" else 0)
