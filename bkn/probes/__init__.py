"""Probes: command-line studies of the norms.

* :mod:`bkn.probes.drift` (``nox -s accuracy``): how far each method's statistics drift
  from the population statistics, by group size and depth.
* :mod:`bkn.probes.training` (``nox -s convergence``): test accuracy vs group size after
  training with each method.
* :mod:`bkn.probes.cli`: the comma-list parsers and flags both command lines share.

Both train with :func:`bkn.probes.engine.train_epochs` on a :class:`bkn.probes.data.Dataset`.
"""
