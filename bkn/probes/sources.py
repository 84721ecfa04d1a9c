"""Your model, your data: the ``--model`` and ``--data`` specs both probes accept (docs/probes.md).

Models (``--model``), built with ``pretrained=False`` and the data's number of classes:

* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False, num_classes=N)`` (``timm.list_models()``);
* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, weights=None, num_classes=N)``
  (``torchvision.models.list_models()``);
* ``package.module:callable`` - ``callable(num_classes=N)`` (or ``callable()`` when it takes no
  ``num_classes``), returning a ``torch.nn.Module``.

A model must contain BatchNorm (the probes compare what replaces it) and map ``(2, 3, S, S)`` images
to ``(2, N)`` logits; each method's network is the model converted with the registry's
:meth:`bkn.methods.Method.convert` (``bkn.convert``).

Data (``--data``), decoded by PIL, resized (shorter side to ``S``, centre crop ``S x S``) and turned into
tensors by torchvision's transforms, read through a ``torch.utils.data.DataLoader`` with
``--workers`` processes, converted to RGB and standardised per channel with the training split's mean
and standard deviation; then held in memory as a :class:`bkn.probes.data.Dataset`:

* ``imagefolder:PATH`` - ``torchvision.datasets.ImageFolder`` (one sub-folder of images per class).
  When PATH holds ``train/`` and ``val/`` (or ``test/``, ``valid/``, ``validation/``) folders, those are the
  splits; otherwise a seeded stratified 80/20 split of the whole folder;
* ``torchvision-dataset:NAME:ROOT`` - ``torchvision.datasets.NAME(ROOT, train=..., download=False)``
  (or ``split="train"/"test"``): files already under ROOT, never downloaded;
* ``digits``, ``photos`` - the suite's built-in sets (scikit-learn's digits, crops of its two photographs) at ``S``.

Inside the probes a data set travels as a *key*: the spec with its options, e.g.
``imagefolder:/data/pets#size=32,classes=2`` (:func:`data_key`), so every process and the weights
cache can rebuild it from the string alone; results record the key in their ``data`` column, the model
spec in ``network``. :func:`label` shortens a key for a report. Only the standard library is imported at
module level (the report reads :func:`label` without torch).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pathlib

DATA_KINDS = ("imagefolder", "torchvision-dataset")
BUILT_IN = ("digits", "photos")
MODEL_KINDS = ("timm", "torchvision")
SPLIT_FOLDERS = ("val", "test", "valid", "validation")
TRAIN_SHARE = 0.8
SEED = 0  # the split and the --max-images subset are fixed; run seeds vary the rest
PHOTO_CROPS = 1024
DEFAULT_IMAGE_SIZE = 32
DEFAULT_WORKERS = 2
WORKERS_VARIABLE = "BKN_DATA_WORKERS"
YOURS = "yours"  # results/yours/<run>/: where runs on your model and data go (the report reads them there)
MODEL_HELP = "timm:NAME, torchvision:NAME or package.module:callable (pretrained=False; num_classes from the data)"
DATA_HELP = "imagefolder:PATH, torchvision-dataset:NAME:ROOT (never downloaded), or a built-in set"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    kind: str  # imagefolder, torchvision-dataset, or a built-in name
    location: str  # the folder; NAME:ROOT; "" for a built-in set
    size: int
    classes: int | None = None  # keep the first N classes (sorted folder names / label order)
    max_images: int | None = None  # a seeded subset of at most this many images per split

    @property
    def key(self) -> str:
        head = f"{self.kind}:{self.location}" if self.location else self.kind
        options = [f"size={self.size}"]
        if self.classes is not None:
            options.append(f"classes={self.classes}")
        if self.max_images is not None:
            options.append(f"max={self.max_images}")
        return head + "#" + ",".join(options)


# -- specs and keys (no torch) ----------------------------------------------------------------------


def is_model_spec(text: str) -> bool:
    """``timm:NAME``, ``torchvision:NAME`` or ``module:callable`` (the suite's own networks have no colon)."""
    return ":" in str(text)


def is_data_key(text: str) -> bool:
    """A key of :func:`data_key` (the built-in probes' own data names are not)."""
    return "#size=" in str(text)


def is_data_spec(text: str) -> bool:
    """A ``--data`` value naming the user's data (not one of a probe's own data names)."""
    return str(text).split(":", 1)[0] in DATA_KINDS or is_data_key(text)


def data_key(spec: str, size: int, classes: int | None = None, max_images: int | None = None) -> str:
    """The key of ``--data spec`` at ``size`` pixels: the folder made absolute; ``ValueError`` for a malformed
    spec (nothing is read here: :func:`check_data` reads)."""
    for name, value in (("image size", size), ("--classes", classes), ("--max-images", max_images)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if size < 8:
        raise ValueError(f"--image-size {size}: give at least 8 pixels (networks downsample by 8 to 32)")
    kind, _, rest = str(spec).partition(":")
    if kind == "imagefolder" and rest:
        location = str(pathlib.Path(rest).expanduser().resolve())
    elif kind == "torchvision-dataset" and rest.count(":") >= 1 and all(rest.split(":", 1)):
        name, root = rest.split(":", 1)
        location = f"{name}:{pathlib.Path(root).expanduser().resolve()}"
    elif kind in BUILT_IN and not rest:
        location = ""
    else:
        raise ValueError(
            f"--data {spec!r}: expected imagefolder:PATH, torchvision-dataset:NAME:ROOT (e.g. "
            f"torchvision-dataset:CIFAR10:~/data) or one of {', '.join(BUILT_IN)}"
        )
    return DataSpec(kind, location, size, classes, max_images).key


def parse_key(key: str) -> DataSpec:
    """The :class:`DataSpec` of a :func:`data_key`."""
    head, _, options = str(key).rpartition("#")
    values = dict(part.split("=", 1) for part in options.split(",") if "=" in part)
    if not head or "size" not in values:
        raise ValueError(f"not a data key: {key!r} (expected SPEC#size=S[,classes=N][,max=M])")
    kind, _, location = head.partition(":")
    as_int = {k: int(v) for k, v in values.items()}
    return DataSpec(kind, location, as_int["size"], as_int.get("classes"), as_int.get("max"))


def label(key: str) -> str:
    """A short name for reports: ``imagefolder:pets (32 px)``; anything that is not a key unchanged."""
    if not is_data_key(key):
        return str(key)
    spec = parse_key(key)
    if spec.kind == "imagefolder":
        head = f"imagefolder:{pathlib.Path(spec.location).name}"
    elif spec.kind == "torchvision-dataset":
        head = f"torchvision-dataset:{spec.location.split(':', 1)[0]}"
    else:
        head = spec.kind
    extra = [f"{spec.size} px"] + ([f"{spec.classes} classes"] if spec.classes else [])
    return f"{head} ({', '.join(extra)})"


def slug(text: str) -> str:
    """A file-name-safe form of a key or model spec (the weights cache's file names)."""
    import hashlib

    short = _safe(label(text))[:40]
    return f"{short}-{hashlib.sha256(str(text).encode()).hexdigest()[:8]}"


# -- the command lines' flags (both probes) -----------------------------------------------------------


def add_flags(parser, image_size: bool = True) -> None:
    """``--model``, ``--classes``, ``--max-images``, ``--workers`` (and ``--image-size`` when ``image_size``); the
    probe's own ``--data`` takes the data specs."""
    parser.add_argument("--model", help=f"your model: {MODEL_HELP}")
    if image_size:
        parser.add_argument(
            "--image-size",
            type=_positive,
            default=DEFAULT_IMAGE_SIZE,
            help="your data (and the built-in sets with --model): images resized and centre-cropped to this side "
            "(default %(default)s)",
        )
    parser.add_argument("--classes", type=_positive, help="your data: keep its first N classes (default all)")
    parser.add_argument(
        "--max-images", type=_positive, help="your data: at most this many images per split, a seeded subset"
    )
    parser.add_argument(
        "--workers",
        type=_positive_or_zero,
        default=DEFAULT_WORKERS,
        help="your data: DataLoader worker processes decoding the images (default %(default)s)",
    )


def user_setups(args, data: list[str], networks: list[str], folder: str) -> list[tuple[str, str]] | None:
    """``(data key, network)`` pairs when the command names the user's model or data (``None`` otherwise, the
    probe's own setups): each ``data`` value (a spec, or a built-in set with ``--model``) x the model (or
    ``networks``); every one checked (files listed, the model built once): ``ValueError`` naming the problem.

    An ``--out`` left at the probe's default (``results/<folder>``) becomes ``results/yours/<run>/<folder>``, where
    the report finds it beside the built-in results (and a run on your data never replaces those)."""
    if not args.model and not any(is_data_spec(d) for d in data):
        return None
    set_workers(args.workers)
    keys = [data_key(d, args.image_size, args.classes, args.max_images) for d in data]
    models = [args.model] if args.model else list(networks)
    for key in keys:
        check_data(key)
        for model in models:
            if is_model_spec(model):
                build_model(model, num_classes(key), args.image_size)
    if pathlib.Path(args.out) == pathlib.Path("results", folder):
        run = "+".join(_safe(label(key)) for key in keys) + "-" + "+".join(_safe(m) for m in models)
        args.out = pathlib.Path("results", YOURS, run, folder)
    return [(key, model) for key in keys for model in models]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


# -- data -------------------------------------------------------------------------------------------


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


# -- models -----------------------------------------------------------------------------------------


def build_model(spec: str, num_classes: int, image_size: int | None = None, check: bool = True):
    """The model of ``--model spec`` with ``num_classes`` outputs and torch's BatchNorm (call after seeding: it
    draws the weights). ``check``: it has BatchNorm, and maps ``(2, 3, S, S)`` images to ``(2, num_classes)``."""
    from torch import nn

    kind, _, name = str(spec).partition(":")
    if not name or not kind:
        raise ValueError(f"--model {spec!r}: expected {MODEL_HELP}")
    if kind == "timm":
        model = _timm(name, num_classes)
    elif kind == "torchvision":
        model = _torchvision(name, num_classes)
    else:
        model = _callable(kind, name, num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec}: returned a {type(model).__name__}, expected a torch.nn.Module")
    if check:
        _check_model(model, spec, num_classes, image_size)
    return model


def _timm(name: str, num_classes: int):
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"--model timm:{name}: timm has no model {name!r}{_close(name, timm.list_models())}; list them with "
            f"timm.list_models('*{name[:4]}*')"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def _torchvision(name: str, num_classes: int):
    from torchvision import models

    known = models.list_models()
    if name not in known:
        raise ValueError(
            f"--model torchvision:{name}: torchvision has no model {name!r}{_close(name, known)}; list them with "
            f"torchvision.models.list_models()"
        )
    return models.get_model(name, weights=None, num_classes=num_classes)


def _callable(module: str, name: str, num_classes: int):
    what = f"--model {module}:{name}"
    try:
        found = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"{what}: cannot import module {module!r} ({err}); expected {MODEL_HELP}") from None
    make = getattr(found, name, None)
    if not callable(make):
        raise ValueError(f"{what}: module {module!r} has no callable {name!r}")
    try:
        params = inspect.signature(make).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "num_classes" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        return make(num_classes=num_classes) if takes else make()
    except TypeError as err:
        raise ValueError(f"{what}: calling it failed ({err}); expected a callable taking num_classes") from None


def _close(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)
    return f" (close: {', '.join(close)})" if close else ""


def _check_model(model, spec: str, num_classes: int, image_size: int | None) -> None:
    import torch
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            f"--model {spec}: {type(model).__name__} has no BatchNorm layer, so there is nothing to compare: the "
            "probes replace each BatchNorm by each method (pick a model with BatchNorm, e.g. timm:resnet18)"
        )
    if image_size is None:
        return
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, image_size, image_size))
    except Exception as err:  # the model's own failure, named
        raise ValueError(
            f"--model {spec}: fails on a batch of 3x{image_size}x{image_size} images ({type(err).__name__}: "
            f"{err}); try a larger --image-size"
        ) from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"--model {spec}: returns {shape} for 2 images, expected logits of shape (2, {num_classes}) (the "
            f"data's classes); a callable must take num_classes"
        )
