"""The prior-chain zoo: how many norms of real torchvision and timm networks use a prior at run time.

Each model of :data:`ZOO` is built without pretrained weights (no download), converted with
``bkn.convert(model, "bkn", group_size=2)`` (the official transition unless told otherwise),
and takes one SGD step on random images (:data:`BATCH` of them, :data:`SIZE` pixels a side
unless :data:`SIZES` says more). The prior report of that training forward then says, per
BKN layer, whether it used a prior and, if not, why (docs/design.md §5).

A norm *has normalization upstream* when some path back from its input reaches another
norm, or a tensor that another norm which ran before it read (the graph walk of
:func:`upstream_of`, through every op, modelled or not). The coverage is the share of those
norms that used a prior; norms without any normalization upstream (a network's first norm)
cannot have one and are counted apart.

``python -m bkn.probes.zoo`` prints the per-model table (``--markdown`` as a docs table,
``--models`` a comma list of ``source:name``, ``--json PATH`` the rows, written atomically);
``--compare BEFORE AFTER`` prints the markdown table of two such JSON files side by side
(docs/zoo.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
from torch import nn

# (source, name): 16 from torchvision, 22 from timm; every one holds BatchNorm layers.
ZOO: tuple[tuple[str, str], ...] = (
    *(
        ("torchvision", n)
        for n in (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnext50_32x4d",
            "densenet121",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "shufflenet_v2_x0_5",
            "mnasnet0_5",
            "efficientnet_b0",
            "efficientnet_v2_s",
            "regnet_y_400mf",
            "regnet_x_400mf",
            "googlenet",
            "inception_v3",
        )
    ),
    *(
        ("timm", n)
        for n in (
            "res2net50_14w_8s",
            "mixnet_s",
            "cspresnet50",
            "ghostnet_100",
            "efficientnet_b0",
            "regnety_002",
            "mobilenetv3_small_050",
            "rexnet_100",
            "hrnet_w18_small",
            "tresnet_m",
            "dla34",
            "dpn68",
            "cspdarknet53",
            "resnet18d",
            "seresnext26d_32x4d",
            "selecsls42b",
            "ese_vovnet19b_dw",
            "lcnet_050",
            "fbnetc_100",
            "spnasnet_100",
            "resnest14d",
            "skresnet18",
        )
    ),
)
FAST = (("torchvision", "shufflenet_v2_x0_5"), ("timm", "mobilenetv3_small_050"))  # the default test run's subset
SIZE, BATCH, CLASSES = 64, 4, 10
SIZES = {("torchvision", "inception_v3"): 96}  # its stem and pools need more than 64 pixels


def build(source: str, name: str) -> nn.Module:
    """The model, randomly initialised (seeded by the caller), ``CLASSES`` outputs."""
    if source == "torchvision":
        import torchvision

        # googlenet keeps its auxiliary heads (their norms train too); inception_v3's need 299-pixel inputs
        options = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True, "aux_logits": False}}
        options = options.get(name, {})
        return torchvision.models.get_model(name, weights=None, num_classes=CLASSES, **options)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES)
    raise ValueError(f"zoo: unknown model source {source!r}; expected 'torchvision' or 'timm'")


def upstream_of(chain) -> dict[str, bool]:
    """Per BKN node: whether any path back from its input reaches a norm, or a tensor read by a norm that
    ran before it in the chain's order (through every op, modelled or not)."""
    rank = {n: i for i, n in enumerate(chain.order)}
    found = {}
    for layer in chain.order:
        stack, seen, hit = list(chain.ops[layer].inputs[:1]), set(), False
        while stack and not hit:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            op = chain.ops[name]
            readers = [r for r in chain.readers.get(name, ()) if rank[r] < rank[layer]]
            hit = bool(readers) or name in chain.norm_nodes
            stack.extend(op.inputs)
        found[layer] = hit
    return found


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)  # googlenet, inception: aux outputs too
    return sum(o.float().square().mean() for o in outs if isinstance(o, torch.Tensor))


def measure(source: str, name: str, transition: str = "official", seed: int = 0) -> dict:
    """One model's coverage: counts, and the reasons of the norms with normalization upstream that got no prior."""
    import bkn

    torch.manual_seed(seed)
    model = build(source, name)
    start = time.perf_counter()
    model = bkn.convert(model, "bkn", group_size=2, transition=transition).train()
    size = SIZES.get((source, name), SIZE)
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    _loss(model(x)).backward()
    optimizer.step()
    rows = bkn.prior_report(model)
    chain = model._bkn_chain
    upstream = upstream_of(chain)
    eligible = {chain.norm_nodes[n] for n, up in upstream.items() if up}
    reasons = collections.Counter(r["last"] for r in rows if r["layer"] in eligible and r["last"] != "prior used")
    return {
        "source": source,
        "model": name,
        "transition": transition,
        "norms": len(rows),
        "upstream": len(eligible),
        "used": sum(r["last"] == "prior used" for r in rows),
        "reasons": dict(reasons),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _short(reason: str) -> str:
    return reason.removeprefix("no prior: ").removeprefix("cannot propagate through ")


def _reasons(reasons: dict) -> str:
    return "; ".join(f"{_short(k)} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "-"


def table(results: list[dict], markdown: bool = False) -> str:
    """The per-model table and the totals (coverage: used / norms with normalization upstream)."""
    head = ("model", "norms", "upstream", "prior used", "coverage", "reasons of the others (count)")
    lines = []
    for r in results:
        why = _reasons(r["reasons"])
        cover = r["used"] / r["upstream"] if r["upstream"] else 1.0
        lines.append((f"{r['source']}:{r['model']}", r["norms"], r["upstream"], r["used"], f"{cover:.1%}", why))
    norms, up, used = (sum(r[k] for r in results) for k in ("norms", "upstream", "used"))
    total = ("all", norms, up, used, f"{used / max(up, 1):.1%} ({used / max(norms, 1):.1%} of all norms)", "")
    lines.append(total)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
        return "\n".join(out)
    return "\n".join("  ".join(str(c) for c in line) for line in [head, *lines])


def compare(before: dict, after: dict) -> str:
    """A markdown table of two runs' JSON (``--json``): per model, the coverage before and after, and the reasons
    of the norms left without a prior after."""
    old = {(r["source"], r["model"]): r for r in before["models"]}
    head = ("model", "norms", "upstream", "prior used before", "prior used after", "reasons before", "reasons after")
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    totals = [0, 0, 0, 0]
    for r in after["models"]:
        b = old.get((r["source"], r["model"]))
        if b is None or (b["norms"], b["upstream"]) != (r["norms"], r["upstream"]):
            raise ValueError(f"zoo compare: {r['source']}:{r['model']} is missing or different in the before run")
        why_before, why = (_reasons(x["reasons"]) for x in (b, r))
        cells = (
            f"{r['source']}:{r['model']}",
            r["norms"],
            r["upstream"],
            f"{b['used']} ({b['used'] / r['upstream']:.0%})",
            f"{r['used']} ({r['used'] / r['upstream']:.0%})",
            why_before,
            why,
        )
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
        totals = [t + v for t, v in zip(totals, (r["norms"], r["upstream"], b["used"], r["used"]))]
    norms, up, before_used, after_used = totals

    def share(used: int) -> str:
        return f"{used} ({used / up:.1%}; {used / norms:.1%} of all norms)"

    out.append(
        f"| all {len(after['models'])} models | {norms} | {up} | {share(before_used)} | {share(after_used)} | | |"
    )
    return "\n".join(out)


def _models(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        source, sep, name = item.partition(":")
        if not sep or source not in ("torchvision", "timm") or not name:
            raise argparse.ArgumentTypeError(f"expected torchvision:NAME or timm:NAME, got {item!r}")
        out.append((source, name))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bkn.probes.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_models, default=list(ZOO), help="comma list of torchvision:NAME, timm:NAME")
    parser.add_argument("--fast", action="store_true", help="only the fast subset (the default test run's)")
    parser.add_argument("--transition", default="official", help="the BKN transition (default official)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", help="write the rows to this JSON file (atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print the markdown table of two --json runs"
    )
    args = parser.parse_args(argv)
    if args.compare:
        import json
        import pathlib

        runs = [json.loads(pathlib.Path(p).read_text()) for p in args.compare]
        print(compare(*runs))
        return runs
    models = list(FAST) if args.fast else args.models
    results = []
    for i, (source, name) in enumerate(models):
        results.append(measure(source, name, args.transition, args.seed))
        r = results[-1]
        line = f"[{i + 1}/{len(models)}] {source}:{name}: {r['used']}/{r['upstream']} ({r['seconds']} s)"
        print(line, file=sys.stderr, flush=True)
    print(table(results, markdown=args.markdown))
    if args.json:
        from .results import write_json

        write_json(args.json, {"transition": args.transition, "seed": args.seed, "models": results})
    return results


if __name__ == "__main__":
    main()
