"""The tables ``python -m suites.chain_cost`` prints, and what its step and ``--processes`` tables share.

Below both :mod:`suites.chain_cost` and :mod:`suites.chain_cost_spread` (which import it), so
that neither imports the other's module for a heading.
"""

from __future__ import annotations

import math

REFERENCE = "torch-bn"  # the unconverted model, the reference of every step ratio


def blocks_table(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"layer (norm alone, given a prior) and block (conv3x3 + norm + ReLU with the chain), forward + backward, "
        f"{s['threads']} threads, {s['rounds']} interleaved rounds, {s['clock']} clock, "
        f"{s.get('allocator', 'default')} allocator; ratio to bn in the same round",
        f"{'input':<14}{'case':<20}{'ms':>9}{'ratio':>8}{'q25..q75':>14}",
    ]
    for text, entry in result["inputs"].items():
        for name, r in entry.items():
            lines.append(
                f"{text:<14}{name:<20}{r['s_median'] * 1e3:>9.2f}{r['ratio_median']:>8.2f}"
                f"{r['ratio_q25']:>7.2f}..{r['ratio_q75']:<5.2f}"
            )
    return "\n".join(lines)


def step_setting(s: dict) -> str:
    """The measured step, as a table's heading starts (this table's and ``--processes``')."""
    return (
        f"ResNet-18 SGD step, {s['size']}x{s['size']}, batch {s['batch']} in groups of {s['group_size']}, "
        f"{s['threads']} threads, {s.get('allocator', 'default')} allocator"
    )


def table(result: dict) -> str:
    s = result["setting"]
    lines = [
        f"{step_setting(s)}, {s['rounds']} interleaved rounds of {s['steps']} steps, {s['clock']} clock",
        f"{'method':<22}{'step ms':>9}{'ratio':>8}{'q25..q75':>14}{'faults/step':>13}",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"{name:<22}{r['step_s_median'] * 1e3:>9.1f}{r['ratio_median']:>8.2f}"
            f"{r['ratio_q25']:>7.2f}..{r['ratio_q75']:<5.2f}{r.get('faults_per_step_median', math.nan):>13.0f}"
        )
    if all("profile" in r for r in result["methods"].values()):
        lines.append(f"profile (self CPU ms per step): {'total':>8}{'conv':>8}{'convs':>7}{'+conv':>8}{'+other':>8}")
        for name, r in result["methods"].items():
            p = r["profile"]
            lines.append(
                f"  {name:<30}{p['self_cpu_s'] * 1e3:>8.1f}{p['conv_s'] * 1e3:>8.1f}{p['conv_calls']:>7.0f}"
                f"{p['extra_conv_s'] * 1e3:>8.1f}{p['extra_other_s'] * 1e3:>8.1f}"
            )
    return "\n".join(lines)
