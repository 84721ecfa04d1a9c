"""Transitions: how a BKN layer's prior is propagated from the previous layer (spec 1.2).

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
* ``"identity"``: the prior is the previous layer's posterior (equal channels needed);
  handled by the chain, no state is propagated.
"""

from .analytic import Analytic
from .montecarlo import MonteCarlo
from .state import Moments, Sample

NAMES = ("official", "analytic", "identity")


def get(name: str, **options):
    """The transition object for a public option value (``identity`` has none: returns None)."""
    if name == "official":
        return MonteCarlo(**options)
    if name == "analytic":
        return Analytic(**options)
    if name == "identity":
        return None
    raise ValueError(f"unknown transition {name!r}; expected one of {', '.join(NAMES)}")


__all__ = ["Analytic", "MonteCarlo", "Moments", "Sample", "NAMES", "get"]
