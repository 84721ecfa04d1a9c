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
module level (the report reads :func:`label` without torch). Modules: :mod:`.keys` (specs, keys, labels),
:mod:`.images` (decoding), :mod:`.models` (building and checking the model).
"""

from __future__ import annotations

import pathlib

from ..cli import positive_int
from .images import check_data, fingerprint, load, load_splits, num_classes, set_workers
from .keys import (
    BUILT_IN,
    DATA_HELP,
    DATA_KINDS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_WORKERS,
    MODEL_HELP,
    YOURS,
    DataSpec,
    _safe,
    data_key,
    is_data_key,
    is_data_spec,
    is_model_spec,
    label,
    parse_key,
    slug,
)
from .models import build_model

__all__ = [
    "BUILT_IN",
    "DATA_HELP",
    "DATA_KINDS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_WORKERS",
    "MODEL_HELP",
    "YOURS",
    "DataSpec",
    "add_flags",
    "build_model",
    "check_data",
    "data_key",
    "fingerprint",
    "is_data_key",
    "is_data_spec",
    "is_model_spec",
    "label",
    "load",
    "load_splits",
    "num_classes",
    "parse_key",
    "set_workers",
    "slug",
    "user_setups",
]


# -- the command lines' flags (both probes) -----------------------------------------------------------


def add_flags(parser, image_size: bool = True) -> None:
    """``--model``, ``--classes``, ``--max-images``, ``--workers`` (and ``--image-size`` when ``image_size``); the
    probe's own ``--data`` takes the data specs."""
    parser.add_argument("--model", help=f"your model: {MODEL_HELP}")
    if image_size:
        parser.add_argument(
            "--image-size",
            type=positive_int,
            default=DEFAULT_IMAGE_SIZE,
            help="your data (and the built-in sets with --model): images resized and centre-cropped to this side "
            "(default %(default)s)",
        )
    parser.add_argument("--classes", type=positive_int, help="your data: keep its first N classes (default all)")
    parser.add_argument(
        "--max-images", type=positive_int, help="your data: at most this many images per split, a seeded subset"
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


def _positive_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)
