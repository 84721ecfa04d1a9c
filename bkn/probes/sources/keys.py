"""The data keys and labels of your data (stdlib only: the report reads :func:`label` without torch).

A key is a ``--data`` spec with its options, e.g. ``imagefolder:/data/pets#size=32,classes=2``: every process
and the weights cache rebuild the data from the string alone; results record it in their ``data`` column.
"""

from __future__ import annotations

import dataclasses
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


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")
