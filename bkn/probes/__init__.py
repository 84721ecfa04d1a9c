"""The lab: what measures the norms, built on the library (:mod:`bkn`), never imported by it.

Probes (command lines):

* :mod:`bkn.probes.drift` (``nox -s accuracy``): how far each method's statistics drift
  from the population statistics, by group size and depth.
* :mod:`bkn.probes.training` (``nox -s convergence``): test accuracy vs group size after
  training with each method.
* :mod:`bkn.probes.demo` (``nox -s demo``): a short BKN-vs-BN speed comparison.

What only the probes use:

* :mod:`bkn.probes.stats`: population statistics, what each method normalizes with, drift metrics,
  the synthetic chains with closed-form truth.
* :mod:`bkn.probes.data`: the data sets, generated locally or shipped inside installed packages.
* :mod:`bkn.probes.engine`: the one training engine (:func:`~bkn.probes.engine.train_epochs`).
* :mod:`bkn.probes.distributed`: process groups for the multi-worker runs.
* :mod:`bkn.probes.results`: the result files' contract (columns, schema versions, atomic
  writes); importing it loads no torch, so the report builder reads results without it.
* :mod:`bkn.probes.cli`: the comma-list parsers and flags the command lines share.

Importing this package loads nothing else: each module imports what it needs.
"""
