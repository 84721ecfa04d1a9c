"""Data sets, networks and the cached short training run of the accuracy probe.

Setups (data x network) and input sizes:

    synthetic x linear-chain     the linear-Gaussian chain (32 channels, 8 norms, 4x4 positions)
    digits    x cifar-resnet20   scikit-learn's digits, upsampled to 16x16, grey repeated to RGB
    digits    x resnet18         the same at 32x32 (torchvision ResNet-18: 1x1 at its last stage)
    photos    x cifar-resnet20   1024 random 32x32 crops of the sample photographs
    photos    x resnet18         1024 random 64x64 crops

States: ``init`` (seeded initialisation) and ``trained`` (a short seeded training run
with torch's BatchNorm at batch 32; weights cached under ``results/cache/accuracy/``).
Every method's network is then built with the *same* weights: the CIFAR ResNet is
constructed with the method's norm and loads the BN network's state dict; torchvision
and the chain are converted with :func:`bkn.convert`, which copies weights. So the
trained state is "trained with BN, then measured with each method's statistics"; the
synthetic chain has no ``trained`` state.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import pathlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bkn
from bkn.models import cifar_resnet
from bkn.results import atomic_path
from bkn.stats import LinearGaussianChain

from .methods import Method

DATA = ("synthetic", "digits", "photos")
NETWORKS = ("linear-chain", "cifar-resnet20", "resnet18")
STATES = ("init", "trained")
INPUT_SIZE = {
    ("synthetic", "linear-chain"): 4,
    ("digits", "cifar-resnet20"): 16,
    ("digits", "resnet18"): 32,
    ("photos", "cifar-resnet20"): 32,
    ("photos", "resnet18"): 64,
}
PHOTO_CROPS = 1024

# The short training run behind the "trained" state (its hash keys the weight cache).
TRAINING = {"norm": "torch BatchNorm2d", "batch_size": 32, "steps": 300, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 5e-4, "schedule": "cosine", "loss": "cross-entropy", "version": 1}


@dataclass
class Dataset:
    """What the probe needs from a data set: random micro-batches and the full evaluation set."""

    name: str
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    chain: LinearGaussianChain | None = None
    num_classes: int = 0

    @property
    def size(self) -> float:
        """Number of samples (infinite for the synthetic chain, whose samples are drawn fresh)."""
        return math.inf if self.chain is not None else len(self.images)

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` distinct random samples (fresh draws for the chain)."""
        if self.chain is not None:
            return self.chain.sample(count, generator)
        if count > len(self.images):
            raise ValueError(f"a batch of {count} is larger than the data set {self.name!r} "
                             f"({len(self.images)} samples)")
        return self.images[torch.randperm(len(self.images), generator=generator)[:count]]

    def batches(self, size: int = 256) -> list[torch.Tensor]:
        """The whole evaluation set in batches (for the population statistics)."""
        if self.chain is not None:
            raise ValueError("the synthetic chain's population statistics are exact; "
                             "it has no finite data set")
        return list(self.images.split(size))


def check_pair(data: str, network: str) -> None:
    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; known: {', '.join(DATA)}")
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
    if (data, network) not in INPUT_SIZE:
        pairs = ", ".join(f"{d}/{n}" for d, n in INPUT_SIZE)
        raise ValueError(f"network {network!r} does not run on data {data!r}; the setups are: {pairs}")


def load_dataset(data: str, network: str) -> Dataset:
    check_pair(data, network)
    size = INPUT_SIZE[(data, network)]
    if data == "synthetic":
        return Dataset(data, chain=LinearGaussianChain(spatial=(size, size)))
    if data == "digits":
        from bkn.data import load_digits
        images, labels = load_digits("all", size=size, channels=3, seed=0)
        return Dataset(data, images, labels, num_classes=10)
    from bkn.data.photos import NUM_CLASSES, load_photos
    images, labels = load_photos(size=size, count=PHOTO_CROPS, seed=0)
    return Dataset(data, images, labels, num_classes=NUM_CLASSES)


# -- networks -----------------------------------------------------------------------------


def base_network(network: str, dataset: Dataset, seed: int) -> nn.Module:
    """The network with torch's BatchNorm, initialised from ``seed``."""
    torch.manual_seed(seed)
    if network == "linear-chain":
        return dataset.chain.model()
    if network == "cifar-resnet20":
        return cifar_resnet(20, "bn", num_classes=dataset.num_classes)
    import torchvision
    return torchvision.models.resnet18(num_classes=dataset.num_classes)


def method_network(network: str, base: nn.Module, method: Method, group_size: int,
                   num_classes: int) -> nn.Module:
    """``base`` with ``method``'s normalization layers (same weights), in training mode."""
    options = dict(method.options)
    if method.uses_groups or method.kind == "ema":
        options["group_size"] = group_size
    if network == "cifar-resnet20":
        model = cifar_resnet(20, method.norm, num_classes=num_classes, **options)
        load_weights(model, base.state_dict())
    else:
        model = bkn.convert(copy.deepcopy(base), method.norm, **options)
    return model.train()


def load_weights(model: nn.Module, state: dict) -> None:
    """Load a BN network's state dict into the same architecture with other norms.

    Every parameter must be loaded; the only keys allowed to differ are buffers (running
    estimates that GN/LN lack, BRN's moving std and BKN's gain statistics, which the
    receiving layers derive or start fresh).
    """
    result = model.load_state_dict(state, strict=False)
    params = {name for name, _ in model.named_parameters()}
    missing = [k for k in result.missing_keys if k in params]
    unexpected = [k for k in result.unexpected_keys
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not fit: missing parameters {missing}, unexpected keys {unexpected}")


# -- the trained state: a short seeded training run, cached -----------------------------


def _cache_file(cache_dir: pathlib.Path, network: str, data: str, seed: int) -> tuple[pathlib.Path, dict]:
    config = {"network": network, "data": data, "input_size": INPUT_SIZE[(data, network)], "seed": seed,
              "photo_crops": PHOTO_CROPS if data == "photos" else None, **TRAINING}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / "accuracy" / f"{network}-{data}-seed{seed}-{key}.pt", config


def trained_network(network: str, dataset: Dataset, seed: int, cache_dir: str | pathlib.Path,
                    progress: bool = False) -> tuple[nn.Module, dict]:
    """The BN network after the short training run; read from the cache or trained and cached (atomically).

    Returns the model and a record ``{"cache": path, "cached": bool, "config": ..., "final_loss": ...}``.
    """
    if dataset.chain is not None:
        raise ValueError("the synthetic chain has no trained state (its weights define the truth)")
    path, config = _cache_file(pathlib.Path(cache_dir), network, dataset.name, seed)
    model = base_network(network, dataset, seed)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("config") == config:
            model.load_state_dict(saved["state_dict"])
            return model, {"cache": str(path), "cached": True, "config": config,
                           "final_loss": saved["final_loss"]}
    started = time.perf_counter()
    final_loss = _train(model, dataset, seed, progress)
    with atomic_path(path) as tmp:
        torch.save({"config": config, "state_dict": model.state_dict(), "final_loss": final_loss}, tmp)
    return model, {"cache": str(path), "cached": False, "config": config, "final_loss": final_loss,
                   "train_s": round(time.perf_counter() - started, 2)}


def _train(model: nn.Module, dataset: Dataset, seed: int, progress: bool) -> float:
    """Seeded SGD with cosine learning rate; returns the mean loss of the last 20 steps."""
    cfg = TRAINING
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg["steps"])
    model.train()
    order, position, losses = torch.randperm(len(dataset.images), generator=generator), 0, []
    steps = range(cfg["steps"])
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="training (cached afterwards)", unit="step", leave=False)
    for _ in steps:
        if position + cfg["batch_size"] > len(order):
            order, position = torch.randperm(len(dataset.images), generator=generator), 0
        index = order[position:position + cfg["batch_size"]]
        position += cfg["batch_size"]
        loss = F.cross_entropy(model(dataset.images[index]), dataset.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    tail = losses[-20:]
    return sum(tail) / len(tail)
