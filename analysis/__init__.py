"""From results to the HTML report: loaders, statistics, plots, sections.

The pipeline, one job per module:

    asv_results.py   .asv/results (asv 0.6 files) -> tidy frames (one row per result, one per sample)
    probes.py        the probes' result files, read through bkn.probes.results (the contract) -> frames
    significance.py  the Mann-Whitney U test used for the significance of a change
    regressions.py   verdicts between a baseline and a head commit; trends across commits
    plots.py         seaborn figures on the tidy frames, as embeddable PNG data URIs
    sections/        one module per report section (environment, timing, comparison, drift,
                     training): frames -> figures, tables, "missing input" notices
    report.py        the command line (``python -m analysis.report``): load, build, render, write
    browser.py       headless Chromium check of a written report, and its PNG screenshot

Every loader tolerates missing and corrupt inputs: it records a warning naming the file
(:class:`analysis.messages.Messages`) and carries on with what it could read.
"""
