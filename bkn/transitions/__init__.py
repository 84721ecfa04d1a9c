"""Transitions: how a BKN layer's prior is propagated from the previous layer (docs/design.md §4).

A transition turns the posterior ``(m, v)`` of normalization layer k-1 into a
prediction ``(m_p, v_p)`` for layer k by pushing a *state* through the modules in
between (ReLU, convolution, pooling, residual sums):

* :class:`MonteCarlo` (``"official"``): the authors' construction. The state is a
  surrogate sample ``z * sqrt(v) + m`` (pre-normalization statistics, gamma/beta
  skipped, one draw per group), pushed through the *same* modules as the real
  activations; the prior is its per-channel spatial mean and variance.
* :class:`Analytic` (``"analytic"``): the same propagation in closed form. The state
  is per-channel moments of the normalized-and-affine activation, pushed through
  ReLU (rectified Gaussian), convolutions and linear layers (independence assumed),
  pooling and residual sums. Deterministic; cost independent of batch and spatial size.
* ``"official-affine"``, ``"official-relu-shortcut"``: ablations of ``official``, each
  changing one thing (see :mod:`bkn.transitions.montecarlo`).
* ``"identity"``: the prior is the previous layer's posterior (equal channels needed);
  handled by the chain, no state is propagated.
"""

from .analytic import Analytic
from .montecarlo import MonteCarlo
from .state import Moments, Sample

NAMES = ("official", "official-affine", "official-relu-shortcut", "analytic", "identity")
MONTE_CARLO = {
    "official": {},
    "official-affine": {"affine": True},
    "official-relu-shortcut": {"shortcut": "activation"},
}


def get(name: str, **options):
    """The transition object for a public option value (``identity`` has none: returns None).

    ``options`` go to the transition's class (``draws=`` for the Monte-Carlo ones).
    """
    if name not in NAMES:
        raise ValueError(f"unknown transition {name!r}; expected one of {', '.join(NAMES)}")
    if name in MONTE_CARLO:
        return MonteCarlo(**MONTE_CARLO[name], **options)
    if options.get("draws", 1) != 1:
        raise ValueError(
            f"transition {name!r} draws no Monte-Carlo samples; draws={options['draws']!r} needs one of "
            f"{', '.join(MONTE_CARLO)}"
        )
    options.pop("draws", None)
    if name == "analytic":
        return Analytic(**options)
    return None  # identity


__all__ = ["Analytic", "MonteCarlo", "Moments", "Sample", "NAMES", "MONTE_CARLO", "get"]
