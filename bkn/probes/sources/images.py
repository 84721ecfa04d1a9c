"""Your images: folders and torchvision data sets decoded by torchvision's transforms through a DataLoader into a
:class:`bkn.probes.data.Dataset` (see :mod:`bkn.probes.sources`). torch and torchvision load inside the functions.
"""

from __future__ import annotations

import inspect
import os
import pathlib

from .keys import (
    BUILT_IN,
    DEFAULT_WORKERS,
    PHOTO_CROPS,
    SEED,
    SPLIT_FOLDERS,
    TRAIN_SHARE,
    WORKERS_VARIABLE,
    DataSpec,
    label,
    parse_key,
)


def check_data(key: str) -> None:
    """Read the folder listing / dataset files (no image decoded); ``ValueError`` naming what was expected."""
    spec = parse_key(key)
    if spec.kind in BUILT_IN:
        return
    for raw in _splits(spec).values():
        _classes_of(raw, spec)


def num_classes(key: str) -> int:
    """The number of classes of ``key`` (its folder listing; no image decoded)."""
    spec = parse_key(key)
    if spec.kind in BUILT_IN:
        return spec.classes or (10 if spec.kind == "digits" else 8)
    return len(_classes_of(next(iter(_splits(spec).values())), spec))


def fingerprint(key: str) -> str:
    """A hash of the files behind ``key`` (names, sizes, modification times): the weights cache's key, so a
    changed folder is trained again."""
    import hashlib

    spec = parse_key(key)
    if spec.kind in BUILT_IN:
        return "built-in"
    root = spec.location if spec.kind == "imagefolder" else spec.location.split(":", 1)[1]
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def set_workers(count: int) -> None:
    """``--workers``: DataLoader workers of every later load, in this process and those it starts."""
    os.environ[WORKERS_VARIABLE] = str(int(count))


def _workers(workers: int | None) -> int:
    """The DataLoader workers: 0 inside a process pool's worker (a daemonic process may not start processes)."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        return 0
    return workers if workers is not None else int(os.environ.get(WORKERS_VARIABLE, DEFAULT_WORKERS))


def load(key: str, workers: int | None = None):
    """The drift probe's data: every image of ``key`` (a folder's ``train/`` when it has split folders) as a
    :class:`bkn.probes.data.Dataset` named ``key``, standardised per channel."""
    spec = parse_key(key)
    if spec.kind in BUILT_IN:
        return _built_in(spec, "all", key)
    raws = _splits(spec)
    images, labels, classes = _decoded(spec, raws.get("whole", raws.get("train")), workers)
    return _dataset(images, labels, classes, images, key)


def load_splits(key: str, workers: int | None = None):
    """The training probe's ``(train, test)`` :class:`bkn.probes.data.Dataset` pair of ``key``: the split folders,
    or a seeded stratified 80/20 split; both standardised with the train split's channel statistics."""
    spec = parse_key(key)
    if spec.kind in BUILT_IN:
        return _built_in(spec, "train", key), _built_in(spec, "test", key)
    raws = _splits(spec)
    if "whole" in raws:
        images, labels, classes = _decoded(spec, raws["whole"], workers)
        train, test = _stratified(labels, TRAIN_SHARE, SEED)
        parts = (images[train], labels[train]), (images[test], labels[test])
    else:
        parts = [_decoded(spec, raws[name], workers)[:2] for name in ("train", "test")]
        classes = _classes_of(raws["train"], spec)
    reference = parts[0][0]
    return tuple(_dataset(x, y, classes, reference, key) for x, y in parts)


def _dataset(images, labels, classes, reference, key: str):
    """A Dataset of ``images`` standardised with the channel mean and standard deviation of ``reference``."""
    import torch

    from bkn.probes.data import Dataset

    mean = reference.mean((0, 2, 3), keepdim=True)
    std = reference.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Dataset(((images - mean) / std).contiguous(), labels.to(torch.int64), num_classes=len(classes), name=key)


def _splits(spec: DataSpec) -> dict:
    """``{"train": raw, "test": raw}`` or ``{"whole": raw}`` (raw: an undecoded torchvision dataset)."""
    if spec.kind == "imagefolder":
        root = pathlib.Path(spec.location)
        _check_folder(root, f"imagefolder:{root}")
        test = next((root / name for name in SPLIT_FOLDERS if (root / name).is_dir()), None)
        if (root / "train").is_dir() and test is not None:
            return {"train": _imagefolder(root / "train", spec), "test": _imagefolder(test, spec)}
        return {"whole": _imagefolder(root, spec)}
    return {"train": _torchvision_dataset(spec, True), "test": _torchvision_dataset(spec, False)}


def _check_folder(root: pathlib.Path, what: str) -> None:
    if not root.exists():
        raise ValueError(f"{what}: no such folder (expected a folder with one sub-folder of images per class)")
    if not root.is_dir():
        raise ValueError(f"{what}: not a folder (expected a folder with one sub-folder of images per class)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ValueError(f"{what}: the folder is not readable (permission denied)")


def _transform(size: int):
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])


def _rgb(path: str):
    """ImageFolder's loader, converting to RGB; an image PIL cannot decode names its file."""
    from PIL import Image

    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except OSError as err:
        raise ValueError(f"{path}: cannot read or decode this image ({err})") from None


class _RGBThen:
    """A transform: the image converted to RGB, then ``transform`` (a class: DataLoader workers pickle it)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image.convert("RGB"))


def _imagefolder(root: pathlib.Path, spec: DataSpec):
    from torchvision.datasets.folder import IMG_EXTENSIONS

    what = f"imagefolder:{root}"
    _check_folder(root, what)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subfolders:
        raise ValueError(
            f"{what}: no class folders (expected one sub-folder of images per class, e.g. {root}/cats/1.png)"
        )
    if spec.classes is not None and spec.classes > len(subfolders):
        raise ValueError(f"--classes {spec.classes}: {what} has only {len(subfolders)} class folders")
    try:
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(root), transform=_transform(spec.size), loader=_rgb)
    except FileNotFoundError as err:
        raise ValueError(
            f"{what}: no images in its class folders ({err}); expected files ending in {', '.join(IMG_EXTENSIONS)}"
        ) from None


def _torchvision_dataset(spec: DataSpec, train: bool):
    import torchvision

    name, root = spec.location.split(":", 1)
    what = f"torchvision-dataset:{name}:{root}"
    cls = getattr(torchvision.datasets, name, None)
    if not inspect.isclass(cls):
        known = ", ".join(n for n in torchvision.datasets.__all__ if n[0].isupper())
        raise ValueError(f"{what}: torchvision.datasets has no data set {name!r}; known: {known}")
    _check_folder(pathlib.Path(root), what)
    params = inspect.signature(cls).parameters
    if "train" in params:
        where = {"train": train}
    elif "split" in params:
        where = {"split": "train" if train else "test"}
    else:
        raise ValueError(f"{what}: {name} takes neither train= nor split=; use imagefolder:PATH instead")
    transform = _transform(spec.size)
    try:
        return cls(root, transform=_RGBThen(transform), download=False, **where)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise ValueError(
            f"{what}: {name}'s files are not under {root} ({err}); the probes never download: fetch them once "
            f"with torchvision.datasets.{name}({root!r}, download=True)"
        ) from None


def _classes_of(raw, spec: DataSpec) -> list:
    """The class names of an undecoded data set (``--classes``: the first N)."""
    classes = list(getattr(raw, "classes", None) or sorted({int(t) for t in _targets(raw)}))
    if spec.classes is not None:
        if spec.classes > len(classes):
            raise ValueError(f"--classes {spec.classes}: {label(spec.key)} has only {len(classes)} classes")
        classes = classes[: spec.classes]
    if len(classes) < 2:
        raise ValueError(
            f"{label(spec.key)}: {len(classes)} class(es) ({', '.join(map(str, classes))}); a classifier needs at "
            "least 2 (expected one sub-folder of images per class)"
        )
    return classes


def _targets(raw) -> list[int]:
    for name in ("targets", "labels"):
        values = getattr(raw, name, None)
        if values is not None:
            return [int(v) for v in values]
    raise ValueError(f"{type(raw).__name__}: no targets or labels attribute; use imagefolder:PATH instead")


def _decoded(spec: DataSpec, raw, workers: int):
    """``(images, labels, classes)`` of ``raw``: the first ``--classes`` classes, at most ``--max-images``."""
    import torch
    from torch.utils.data import DataLoader, Subset

    classes = _classes_of(raw, spec)
    index = [i for i, t in enumerate(_targets(raw)) if t < len(classes)]
    if spec.max_images is not None and len(index) > spec.max_images:
        keep = torch.randperm(len(index), generator=torch.Generator().manual_seed(SEED))[: spec.max_images]
        index = [index[i] for i in sorted(keep.tolist())]
    if not index:
        raise ValueError(f"{label(spec.key)}: no images in the first {len(classes)} classes")
    loader = DataLoader(Subset(raw, index), batch_size=64, num_workers=_workers(workers), shuffle=False)
    images, labels = [], []
    try:
        for x, y in loader:
            images.append(x)
            labels.append(torch.as_tensor(y))
    except Exception as err:  # a worker's error arrives re-raised with its traceback as text
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise ValueError(f"{label(spec.key)}: reading the images failed: {lines[-1] if lines else err}") from None
    return torch.cat(images), torch.cat(labels), classes


def _stratified(labels, share: float, seed: int):
    """Seeded per-class split of the indices: ``share`` of each class (at least one) to train, the rest to test."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for value in torch.unique(labels):
        members = torch.nonzero(labels == value).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        cut = max(1, min(len(members) - 1, round(share * len(members)))) if len(members) > 1 else 1
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _built_in(spec: DataSpec, split: str, key: str):
    from bkn.probes.data import Dataset, digits_dataset, photos_dataset

    if spec.kind == "digits":
        data = digits_dataset("all" if split == "all" else split, size=spec.size, channels=3, seed=SEED)
    else:
        whole = photos_dataset(size=spec.size, count=PHOTO_CROPS, seed=SEED)
        data = whole
        if split != "all":
            train, test = _stratified(whole.labels, TRAIN_SHARE, SEED)
            index = train if split == "train" else test
            data = Dataset(whole.images[index], whole.labels[index], whole.num_classes)
    if spec.classes is not None:
        keep = data.labels < spec.classes
        data = Dataset(data.images[keep], data.labels[keep], spec.classes)
    return Dataset(data.images, data.labels, data.num_classes, name=key)
