"""Data sets, networks and the cached short training run of the drift probe.

Setups (data x network) and input sizes:

    synthetic x residual-chain   the residual linear-Gaussian chain (16 channels, 8 norms, 8x8 positions
                                 subsampled to 4x4 and 2x2; :mod:`bkn.probes.stats.residual_chain`)
    digits    x cifar-resnet20   scikit-learn's digits, upsampled to 16x16, grey repeated to RGB
    digits    x resnet18         the same at 32x32 (torchvision ResNet-18: 1x1 at its last stage)
    photos    x cifar-resnet20   1024 random 32x32 crops of the sample photographs
    photos    x resnet18         1024 random 64x64 crops

States: ``init`` (seeded initialisation), ``trained`` (a short seeded training run of
the network with torch's BatchNorm by :func:`bkn.probes.engine.train_epochs`, the engine the
training probe uses too) and ``trained-own`` (the same run with the measured method's own
norms, at normalization group :data:`TRAIN_GROUP`, then measured at each group size with its own layers
regrouped: :func:`regroup`); weights cached under
``<cache>/accuracy/``, keyed by the whole configuration. In ``init`` and ``trained`` every
method's network is built with the *same* weights: the CIFAR ResNet is constructed with
the method's norm and loads the BN network's state dict; torchvision is converted with
:meth:`bkn.methods.Method.convert`, which copies weights; the chain is rebuilt with the
method's norms. So ``trained`` is "trained with BN, then measured with each method's
statistics", ``trained-own`` "trained and measured with the method". The synthetic chain
has only ``init`` (its weights define the truth).

For BKN the population statistics are not what it normalizes with at inference (the
running average of its posteriors, measured as ``<method>-ema``): they are the reference
every method is measured against, and the statistics an ideal BN would use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pathlib
import time
from typing import Union

import torch
from torch import nn

from bkn import cross_iteration_conversion
from bkn import methods as registry
from bkn.models import cifar_resnet
from bkn.probes import engine as training
from bkn.probes import sources
from bkn.probes.data import Dataset, digits_dataset, photos_dataset
from bkn.probes.results import atomic_path
from bkn.probes.stats import is_batch_norm, population_statistics
from bkn.probes.stats.residual_chain import ResidualChainNet, ResidualGaussianChain
from bkn.replacements import report_of

DATA = ("synthetic", "digits", "photos")
NETWORKS = ("residual-chain", "cifar-resnet20", "resnet18")
STATES = ("init", "trained", "trained-own")
OWN = "trained-own"
TRAIN_GROUP = 4  # the normalization group of the trained-own runs: micro-batches, in a 32-sample SGD batch
INPUT_SIZE = {
    ("synthetic", "residual-chain"): 8,
    ("digits", "cifar-resnet20"): 16,
    ("digits", "resnet18"): 32,
    ("photos", "cifar-resnet20"): 32,
    ("photos", "resnet18"): 64,
}
PHOTO_CROPS = 1024

# The short training run behind the "trained" state (its hash keys the weight cache; "batch_size" is the SGD
# batch). "final_loss" in the record is the mean cross-entropy of the last 20 steps.
TRAINING = {
    "norm": "torch BatchNorm2d",
    "batch_size": 32,
    "steps": 300,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "loss": "cross-entropy",
    "version": 1,
}
FINAL_LOSS_STEPS = 20

Source = Union[Dataset, ResidualGaussianChain]  # where a setup's micro-batches come from: both have .sample()


def size(source: Source) -> float:
    """Number of samples (infinite for the synthetic chain, whose samples are drawn fresh)."""
    return math.inf if isinstance(source, ResidualGaussianChain) else len(source)


def population(source: Source, model: nn.Module, per_sample: bool) -> dict:
    """The exact population statistics of ``model``'s layers: in closed form on the chain, over the whole
    data set (in batches of 256) otherwise."""
    if isinstance(source, ResidualGaussianChain):
        return source.population_statistics(model, per_sample=per_sample)
    return population_statistics(model, [x for x, _ in source.batches(256)], per_sample=per_sample)


def check_pair(data: str, network: str) -> None:
    """``ValueError`` unless ``data`` x ``network`` is a setup: a built-in pair, or a user setup (a data key of
    :func:`bkn.probes.sources.data_key` with a ``--model`` spec or a built-in image network)."""
    if sources.is_data_key(data):
        if not (sources.is_model_spec(network) or network in ("cifar-resnet20", "resnet18")):
            raise ValueError(f"network {network!r} does not run on images; give --model or cifar-resnet20, resnet18")
        return
    if sources.is_model_spec(network):
        raise ValueError(f"--model {network}: give its data as a key of bkn.probes.sources.data_key, got {data!r}")
    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; known: {', '.join(DATA)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
    if (data, network) not in INPUT_SIZE:
        pairs = ", ".join(f"{d}/{n}" for d, n in INPUT_SIZE)
        raise ValueError(f"network {network!r} does not run on data {data!r}; the setups are: {pairs}")


def load_source(data: str, network: str) -> Source:
    """The setup's data: the chain, all 1797 digits (3 channels), or the photograph crops."""
    check_pair(data, network)
    if sources.is_data_key(data):  # the user's data (docs/probes.md, "Your model, your data")
        return sources.load(data)
    side = INPUT_SIZE[(data, network)]
    if data == "synthetic":
        return ResidualGaussianChain(spatial=(side, side))
    if data == "digits":
        return digits_dataset("all", size=side, channels=3, seed=0)
    return photos_dataset(size=side, count=PHOTO_CROPS, seed=0)


# -- networks -----------------------------------------------------------------------------


def base_network(network: str, source: Source, seed: int) -> nn.Module:
    """The network with torch's BatchNorm, initialised from ``seed``."""
    torch.manual_seed(seed)
    if network == "residual-chain":
        return source.model()
    if network == "cifar-resnet20":
        return cifar_resnet(20, "bn", num_classes=source.num_classes)
    if sources.is_model_spec(network):
        return sources.build_model(network, source.num_classes, check=False)
    import torchvision

    return torchvision.models.resnet18(num_classes=source.num_classes)


def method_network(
    network: str, base: nn.Module, method: registry.Method, group_size: int, total_steps: int | None = None
) -> nn.Module:
    """``base`` with ``method``'s normalization layers (same weights), in training mode.

    A ``base`` that already holds them (the trained-own network, converted or prepared for ``method``) is
    :func:`regroup`-ed, not converted again: converting finds no BatchNorm to replace, so it would keep the
    training group (and fx cannot trace the rivals' layers, which warns).
    """
    if holds(base, method):
        return regroup(copy.deepcopy(base), method, group_size).train()
    options = method.layer_options(group_size, total_steps)
    if method.converts:  # the rivals (gn-ws, frn, evonorm-*): bkn.convert swaps convolutions or absorbs activations
        model = method.convert(copy.deepcopy(base), group_size, total_steps=total_steps)
    elif network == "cifar-resnet20":
        num_classes = base.fc.out_features
        model = cifar_resnet(20, method.norm, num_classes=num_classes, **options)
        load_weights(model, base.state_dict())
    elif network == "residual-chain":
        model = ResidualChainNet(base.conv0.in_channels, base.depth, base.subsample_after, method.norm, **options)
        load_weights(model, base.state_dict())
    else:
        model = method.convert(copy.deepcopy(base), group_size, total_steps=total_steps)
        return model.train()
    return cross_iteration_conversion.prepare(model, method.norm).train()  # mabn, cbn: docs/design.md §16


def holds(model: nn.Module, method: registry.Method) -> bool:
    """Whether ``model`` already holds ``method``'s layers: ``bkn.convert`` or ``prepare`` made it for its norm."""
    report = report_of(model)
    return report is not None and report.method == method.norm


def regroup(model: nn.Module, method: registry.Method, group_size: int) -> nn.Module:
    """``model``, which :func:`holds` ``method``'s layers, with each of them at normalization group ``group_size``
    (in place; its modules stay what they are). ``ValueError`` naming the layer where that can't be done."""
    method.layer_options(group_size)  # checks group_size
    if not method.uses_groups:  # gn-ws, frn, evonorm-s0 (and gn, ln, in): per-sample norms, no group to set
        return model
    report = report_of(model)
    layers = {row.module: model.get_submodule(row.module) for row in report.of("norm")}
    for name, layer in layers.items():  # BatchStatNorm (ghost BN, BRN, BKN, MABN, CBN), EvoNormB0: read per forward
        if not hasattr(layer, "group_size"):
            raise ValueError(
                f"regroup to {method.name!r}: layer {name!r} ({type(layer).__name__}) has no group_size, so it "
                f"can't be set to {group_size}; the network does not hold {method.name}'s layers"
            )
        layer.group_size = group_size
    others = [
        f"{name!r} ({type(m).__name__})" for name, m in model.named_modules() if is_batch_norm(m) and name not in layers
    ]
    if others:
        raise ValueError(
            f"regroup to {method.name!r}: batch-statistic layers {', '.join(others)} are not {method.name}'s "
            f"(bkn.convert did not replace them), so their group can't be set to {group_size}"
        )
    return model


def load_weights(model: nn.Module, state: dict) -> None:
    """Load a BN network's state dict into the same architecture with other norms.

    Every parameter must be loaded; the only keys allowed to differ are buffers (running
    estimates that GN/LN lack, BRN's moving std and BKN's gain statistics, which the
    receiving layers derive or start fresh).
    """
    result = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    unexpected = [
        k for k in result.unexpected_keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing parameters {missing}, unexpected keys {unexpected}")


# -- the trained state: a short seeded training run, cached -----------------------------


def _cache_file(
    cache_dir: pathlib.Path, network: str, data: str, seed: int, method: registry.Method | None = None
) -> tuple[pathlib.Path, dict]:
    config = {
        "network": network,
        "data": data,
        "input_size": INPUT_SIZE[(data, network)] if (data, network) in INPUT_SIZE else sources.parse_key(data).size,
        "seed": seed,
        "photo_crops": PHOTO_CROPS if data == "photos" else None,
        **TRAINING,
    }
    if sources.is_data_key(data):
        config["files"] = sources.fingerprint(data)
    if method is not None:  # trained with the method's own norms
        config["norm"] = method.norm
        config["method"] = method.name
        config["options"] = {k: repr(v) for k, v in sorted(method.layer_options(TRAIN_GROUP).items())}
        config["group_size"] = TRAIN_GROUP
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    who = f"-{method.name}" if method is not None else ""  # the BN network keeps its earlier file name
    if sources.is_data_key(data):  # paths and specs: file-name-safe
        network, data = sources.slug(network), sources.slug(data)
    return cache_dir / "accuracy" / f"{network}-{data}{who}-seed{seed}-{key}.pt", config


def trained_network(
    network: str,
    data: Source,
    seed: int,
    cache_dir: str | pathlib.Path,
    progress=None,
    method: registry.Method | None = None,
) -> tuple[nn.Module, dict]:
    """The network after the short training run - with torch's BatchNorm, or with ``method``'s norms at
    group size :data:`TRAIN_GROUP` - read from the cache or trained and cached (atomically).

    Returns the model and a record ``{"cache": path, "cached": bool, "config": ..., "final_loss": ...}``.
    ``progress``: a :class:`~bkn.probes.drift.progress.Progress` (or None).
    """
    if not isinstance(data, Dataset):
        raise ValueError("the synthetic chain has no trained state (its weights define the truth)")
    path, config = _cache_file(pathlib.Path(cache_dir), network, data.name, seed, method)
    model = base_network(network, data, seed)
    if method is not None:
        torch.manual_seed(seed)  # BKN's Monte-Carlo draws during training
        model = method_network(network, model, method, TRAIN_GROUP, total_steps=TRAINING["steps"])
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("config") == config:
            model.load_state_dict(saved["state_dict"])
            return model, {"cache": str(path), "cached": True, "config": config, "final_loss": saved["final_loss"]}
    started = time.perf_counter()
    final_loss = train(model, data, seed, progress, method.name if method is not None else "BN")
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state_dict": model.state_dict(), "final_loss": final_loss}, tmp)
    return model, {
        "cache": str(path),
        "cached": False,
        "config": config,
        "final_loss": final_loss,
        "train_s": round(time.perf_counter() - started, 2),
    }


def train(model: nn.Module, data: Dataset, seed: int, progress=None, what: str = "BN") -> float:
    """:data:`TRAINING`'s run of ``model`` (built from ``seed`` just before); returns its final loss."""
    recipe = training.Recipe(
        batch_size=TRAINING["batch_size"],
        lr=TRAINING["lr"],
        momentum=TRAINING["momentum"],
        weight_decay=TRAINING["weight_decay"],
    )
    step = None
    if progress is not None:
        step = progress.task(
            f"training the {what} network ({TRAINING['steps']} steps, cached afterwards)", TRAINING["steps"]
        )
    try:
        epochs = training.train_epochs(model, data, recipe, TRAINING["steps"], seed, step)
        losses = [loss.item() for epoch in epochs for loss in epoch.losses]
    finally:
        if progress is not None:
            progress.end_task()
    tail = losses[-FINAL_LOSS_STEPS:]
    return sum(tail) / len(tail)
