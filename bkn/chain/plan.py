"""The plan of the prior chain: each BKN layer's route (sources, ops in between, predicted status) and the report.

:class:`_Planning` is the part of :class:`~bkn.chain.PriorChain` that walks the flat graph
(:mod:`bkn.chain.graph`) back from a layer to the normalization layers that feed it, and
that turns the plan and the last training forward into rows (:meth:`_Planning.report`,
printed by :func:`format_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

FIRST_LAYER = "no prior: first normalization layer (its input derives from the model input only)"
PART_INPUT = "no prior: part of its input derives from the model input only (no statistics to propagate)"
NOT_RUN = "not run in training mode yet"


@dataclass
class PriorRoute:
    """How one BKN layer gets its prior (a row of the summary)."""

    layer: str
    sources: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    status: str = ""


class _Planning:
    """Routes and report rows (a part of :class:`~bkn.chain.PriorChain`: uses its ``ops``,
    ``readers``, ``norm_nodes``, ``modules``, ``transition`` and what the hooks recorded)."""

    def _trace(self, node_name: str, earlier: dict[str, int]) -> PriorRoute:
        """The route of BKN node ``node_name``'s prior when the BKN nodes ``earlier`` (name -> rank)
        ran before it: sources, ops in between and the status the plan predicts."""
        route = PriorRoute(self.norm_nodes[node_name])
        problems: list[str] = []
        visited: list[str] = []
        reached_input = [False]
        seen: set[str] = set()
        stack = list(self.ops[node_name].inputs[:1])
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            readers = [r for r in self.readers.get(name, ()) if r in earlier]
            if readers:  # read by a layer that ran: its posterior stands for this tensor
                route.sources.append(self.norm_nodes[max(readers, key=earlier.get)] + " (input)")
                continue
            op = self.ops[name]
            if op.kind == "norm":
                route.sources.append(op.target)
                layer = self.modules[op.target]
                for attr in getattr(layer, "_bkn_post", ()):  # a converted norm-activation: its act is on the path
                    if not isinstance(getattr(layer, attr), nn.Identity):
                        visited.append((name, attr))
                continue
            if op.kind == "input":
                reached_input[0] = True
                continue
            if op.kind == "unsupported":
                problems.append(f"cannot propagate through {op.label} ({op.why})")
                continue
            if op.kind not in ("size", "arith", "attr"):  # shape arithmetic, the model's tensors: not ops on statistics
                visited.append(name)
            stack.extend(op.inputs)
        position = {name: i for i, name in enumerate(self.ops)}

        def label(item) -> str:
            if isinstance(item, tuple):  # (norm node, attribute)
                module = getattr(self.modules[self.ops[item[0]].target], item[1])
                return f"{type(module).__name__}({self.ops[item[0]].target}.{item[1]})"
            return self.ops[item].label

        def rank(item) -> float:
            return position[item[0]] + 0.5 if isinstance(item, tuple) else position[item]

        route.path = [label(n) for n in sorted(visited, key=rank)]
        route.sources.sort(key=lambda s: position.get(self._node_of(s), 0))
        if self.transition is None:
            route.path = ["identity"]
        if problems:
            route.status = "no prior: " + "; ".join(sorted(set(problems)))
            if self.fallback == "identity":
                route.status += " (fallback: identity)"
        elif not route.sources:
            route.status = FIRST_LAYER
        elif reached_input[0]:
            route.status = PART_INPUT
        else:
            route.status = f"prior ({self.transition_name})"
        return route

    def _node_of(self, source: str) -> str:
        module = source.removesuffix(" (input)")
        return next((n for n, m in self.norm_nodes.items() if m == module), "")

    def report(self) -> list[dict]:
        """Per BKN layer in execution order: ``layer``, ``sources``, ``path``, ``plan`` (the static
        status) and ``last`` (the last training forward: ``"prior used"``, ``"no prior: <why>"``, or
        that it did not run); ``sources``/``path`` are those of the last training forward where it ran."""
        rows = []
        ran = {n: i for i, n in enumerate(self._last_order)}
        for name in self.order:
            plan = self.routes[name]
            route = plan
            if name in self._last:
                route = self._trace(name, {n: i for n, i in ran.items() if i < ran[name]})
                last = self._last[name]
            else:
                last = "did not run in the last training forward" if self._last_order else NOT_RUN
            rows.append(
                {
                    "layer": plan.layer,
                    "sources": list(route.sources),
                    "path": list(route.path),
                    "plan": plan.status,
                    "last": last,
                }
            )
        return rows

    def summary(self) -> str:
        return format_report(self.report())


def format_report(report: list[dict]) -> str:
    """The rows of a prior report as a printable table (long cells keep their end: the ops nearest the layer)."""
    rows = [("layer", "prior from", "through", "plan", "last training forward")]
    for r in report:
        rows.append((r["layer"], ", ".join(r["sources"]) or "-", " > ".join(r["path"]) or "-", r["plan"], r["last"]))

    def clip(text: str, width: int = 60) -> str:
        return text if len(text) <= width else "..." + text[-(width - 3) :]

    rows = [(clip(a), clip(b), clip(c), d, e) for a, b, c, d, e in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([row[i].ljust(widths[i]) for i in range(4)] + [row[4]]) for row in rows)
