"""Build the self-contained HTML report: ``python -m analysis.report`` (``nox -s report``).

Reads whatever results exist -- asv results under ``.asv/results`` (every machine and
commit), the drift probe's ``results/accuracy/drift.parquet`` and the training
probe's ``results/convergence/convergence.parquet`` and the GPU check's ``results/gpu/gpu.parquet``
-- builds the sections (environment, timing, regressions, statistic drift, training probe, GPU), renders them with
the jinja2 template ``analysis/templates/report.html.j2`` into one HTML file whose
images are embedded as PNG data URIs (it opens offline), and saves the tidy frames the
sections drew from beside it, in ``<report stem>_data/`` (CSV). Every file is written
atomically. A missing input gives a section that says which command produces it; a
corrupt file gives a warning naming it, in the output and at the top of the report.

Exit status: 0; 1 with ``--fail-on-regression`` when a significant regression was found;
2 when a comparison asked for with ``--base``/``--head`` is impossible (the report is
still written).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import re
import shlex
import sys

import jinja2
import markupsafe

from bkn.probes.results import atomic_path

from .asv_results import load_asv_results
from .messages import Messages
from .probes import load_drift, load_gpu, load_training
from .regressions import DEFAULT_ALPHA, DEFAULT_THRESHOLD, threshold_arg
from .sections import SECTIONS, Inputs, Section, build
from .sections.base import ROUNDS_ALPHA

TEMPLATES = pathlib.Path(__file__).resolve().parent / "templates"


def _sections(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(SECTIONS)}"
        )
    return names


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1), got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Build the self-contained HTML report (timings, regressions, statistic drift, training "
        "probe) from whatever results exist.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Exit status: 0; 1 with --fail-on-regression when a significant regression was found; 2 when "
        "the comparison asked for with --base/--head is impossible (the report is still written).",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("reports/report.html"),
        help="the HTML file to write; the tidy data goes to <stem>_data/ beside it",
    )
    p.add_argument(
        "--sections",
        type=_sections,
        default=",".join(SECTIONS),
        help="comma-separated sections to build",
    )
    p.add_argument(
        "--asv-results",
        type=pathlib.Path,
        default=pathlib.Path(".asv/results"),
        help="asv results_dir (benchmarks.json and one folder per machine)",
    )
    p.add_argument(
        "--results",
        type=pathlib.Path,
        default=pathlib.Path("results"),
        help="folder holding the probes' results (accuracy/drift.parquet, convergence/convergence.parquet)",
    )
    p.add_argument(
        "--base",
        help="baseline commit (a git revision or a hash prefix; default: the second latest "
        "commit with asv results, or the one before --head)",
    )
    p.add_argument("--head", help="head commit (default: the latest commit with asv results)")
    p.add_argument(
        "--threshold",
        type=threshold_arg,
        default=DEFAULT_THRESHOLD,
        help="smallest relative change reported, as a ratio or a fraction: 1.10 (= 0.1 = 10%%) flags "
        "head/base >= 1.1 or <= 1/1.1",
    )
    p.add_argument(
        "--alpha",
        type=_probability,
        default=DEFAULT_ALPHA,
        help="significance level of the Mann-Whitney U test on the recorded samples",
    )
    p.add_argument(
        "--rounds-dir",
        type=pathlib.Path,
        default=pathlib.Path(".asv/rounds"),
        help="rounds files of `nox -s continuous`: when one exists for the compared pair, its paired-rounds "
        "verdicts replace the pooled-sample test",
    )
    p.add_argument(
        "--rounds-alpha",
        type=_probability,
        default=ROUNDS_ALPHA,
        help="significance level of the paired-rounds t-test (analysis.rounds)",
    )
    p.add_argument(
        "--no-base",
        metavar="REASON",
        help="there is no baseline commit (REASON says why): the Regressions section says so instead of comparing",
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit with status 1 when a significant regression is found (for CI gating)",
    )
    p.add_argument("--repo", default=".", help="git repository used to resolve --base/--head revisions")
    p.add_argument("--title", default="bkn-suite report", help="title of the page")
    p.add_argument("--quiet", action="store_true", help="do not echo warnings to stderr")
    return p


def codify(text: str) -> markupsafe.Markup:
    """Escape ``text`` and render `backticked` spans as <code>."""
    escaped = str(markupsafe.escape(text))
    return markupsafe.Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


def render(
    sections: list[Section], warnings: list[str], *, title: str, data_dir: str, sources: str, command: str
) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["codify"] = codify
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return env.get_template("report.html.j2").render(
        title=title,
        sections=sections,
        warnings=warnings,
        generated=generated,
        data_dir=data_dir,
        sources=sources,
        command=command,
    )


def save_data(sections: list[Section], folder: pathlib.Path) -> list[pathlib.Path]:
    """Each section's tidy frames as CSV in ``folder`` (atomically); older runs' stale files are removed."""
    written = []
    for section in sections:
        for name, frame in section.data.items():
            path = folder / f"{section.id}_{name}.csv"
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False)
            written.append(path)
    if folder.is_dir():
        for old in folder.glob("*.csv"):
            if old not in written:
                old.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    messages = Messages(echo=not args.quiet)
    inputs = Inputs(
        asv=load_asv_results(args.asv_results, messages),
        drift=load_drift(args.results, messages),
        training=load_training(args.results, messages),
        messages=messages,
        base=args.base,
        head=args.head,
        threshold=args.threshold,
        alpha=args.alpha,
        repo=args.repo,
        rounds_dir=args.rounds_dir,
        rounds_alpha=args.rounds_alpha,
        no_base=args.no_base,
        gpu=load_gpu(args.results, messages),
    )
    sections = build(inputs, args.sections)

    out = args.out
    data_dir = out.parent / f"{out.stem}_data"
    save_data(sections, data_dir)
    sources = f"{args.asv_results} ({len(inputs.asv.files)} asv result files) and {args.results}/"
    command = "python -m analysis.report " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    html = render(
        sections,
        list(messages),
        title=args.title,
        data_dir=data_dir.name,
        sources=sources,
        command=command.strip(),
    )
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")

    for section in sections:
        print(f"  {section.title}: {section.status}")
    print(f"Report written: {out.resolve()}")
    print(f"Open it in a browser: file://{out.resolve()}")
    if inputs.errors:
        for error in inputs.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    if args.fail_on_regression and inputs.regressions_found:
        print(
            f"FAILED: {inputs.regressions_found} significant regression(s) (see the Regressions section)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
