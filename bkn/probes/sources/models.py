"""Your model: ``timm:NAME``, ``torchvision:NAME`` or ``package.module:callable``, built unpretrained with the data's
classes and checked (see :mod:`bkn.probes.sources`). torch, timm and torchvision load inside the functions.
"""

from __future__ import annotations

import importlib
import inspect

from .keys import MODEL_HELP


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
