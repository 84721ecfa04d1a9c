"""What ``bkn.convert`` replaced: one :class:`ConversionReport` per converted model (docs/design.md §15, §16).

Every conversion attaches one (``bkn.conversion_report(model)`` reads it): the plain norm swap (each
BatchNorm and its new class; a BKN layer's note is its prior's plan), the rivals of
:mod:`bkn.rivals.conversion` (norms, absorbed activations, convolutions swapped for weight-standardized
ones) and MABN/CBN (:mod:`bkn.cross_iteration_conversion`: centred convolutions, each CBN layer's wiring).
What a conversion could not do is in ``problems`` (and, where the conversion says so, a warning).

This module imports neither torch nor timm. (It is not named ``conversion_report``: importing a submodule of
that name would hide the function ``bkn.conversion_report``.)
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

ATTRIBUTE = "_bkn_conversion_report"  # where a converted model keeps its report
ROLES = ("norm", "activation", "conv")


@dataclasses.dataclass(frozen=True)
class Replacement:
    """One change: ``module`` (its name in the model, ``""`` for the model itself) of class ``old`` became
    ``new`` (class names without their module)."""

    module: str
    role: str  # "norm", "activation" (absorbed into the norm before it) or "conv"
    old: str
    new: str
    note: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Replacement: role {self.role!r} is not one of {ROLES}")


@dataclasses.dataclass
class ConversionReport:
    """What converting to ``method`` replaced, what it could not do, and whether the graph was rewritten."""

    method: str
    replaced: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)
    graph_module: bool = False  # the returned model is a torch.fx.GraphModule (an activation call was removed)

    def add(self, module: str, role: str, old, new, note: str = "") -> Replacement:
        """Append a :class:`Replacement` (``old``/``new``: classes or class names)."""
        row = Replacement(module, role, _name(old), _name(new), note)
        self.replaced.append(row)
        return row

    def counts(self) -> Counter:
        """``Counter`` of ``(role, old, new)``."""
        return Counter((r.role, r.old, r.new) for r in self.replaced)

    def of(self, role: str) -> list[Replacement]:
        """The replacements of one role, in order."""
        return [r for r in self.replaced if r.role == role]

    def rows(self) -> list[dict]:
        return [dataclasses.asdict(r) for r in self.replaced]

    def __str__(self) -> str:
        lines = [f"bkn.convert to {self.method!r}: {len(self.replaced)} replacements"]
        for r in self.replaced:
            note = f"  ({r.note})" if r.note else ""
            lines.append(f"  {r.role:<10} {r.module or '(the model)':<32} {r.old} -> {r.new}{note}")
        if self.graph_module:
            lines.append("  the model is a torch.fx.GraphModule: activation calls were removed from its graph")
        lines += [f"  could not: {p}" for p in self.problems]
        return "\n".join(lines)


def _name(cls) -> str:
    return cls if isinstance(cls, str) else cls.__name__


def _graph_meta(model) -> dict | None:
    """A torch.fx GraphModule's ``meta`` dict, else None. Its deep copy rebuilds the module from the graph and
    keeps no other attribute, but deep-copies ``meta`` (torch >= 2.1); torch.fx is only looked up, never imported."""
    fx = sys.modules.get("torch.fx")
    return model.meta if fx is not None and isinstance(model, fx.GraphModule) else None


def attach(model, report: ConversionReport):
    """Keep ``report`` on ``model`` (read by :func:`report_of`), also through a deep copy; returns ``model``."""
    setattr(model, ATTRIBUTE, report)
    meta = _graph_meta(model)
    if meta is not None:  # the rivals' conversion returns a GraphModule where it removed activation calls
        meta[ATTRIBUTE] = report
    return model


def report_of(model) -> ConversionReport | None:
    """The report :func:`attach` kept on ``model`` (or on the model it was deep-copied from), else None."""
    report = getattr(model, ATTRIBUTE, None)
    if report is None:
        report = (_graph_meta(model) or {}).get(ATTRIBUTE)
    return report if isinstance(report, ConversionReport) else None


def conversion_report(model) -> ConversionReport:
    """The report of the ``bkn.convert`` call that produced ``model``; ``ValueError`` for any other model."""
    report = report_of(model)
    if report is None:
        raise ValueError(
            f"conversion_report: this {type(model).__name__} carries no conversion report; it was not returned by "
            f"bkn.convert(model, norm) (or bkn.methods.get(name).convert(model)), nor prepared by "
            f"bkn.cross_iteration_conversion.prepare(model, 'mabn' | 'cbn'). Convert it first"
        )
    return report


__all__ = ["ATTRIBUTE", "ConversionReport", "Replacement", "attach", "conversion_report", "report_of"]
