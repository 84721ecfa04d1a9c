"""The micro-batch rivals built from timm's layers: GN+WS, FRN+TLU, EvoNorm-B0 and -S0 (docs/design.md §15).

* :mod:`bkn.rivals.layers` - the layers (timm's, with the grouping and the 1-d inputs this suite
  needs); imports timm. ``bkn.norms.create("frn", C)`` etc. build them.
* :mod:`bkn.rivals.conversion` - what ``bkn.convert(model, "frn")`` etc. do: swap the convolutions
  (gn-ws), absorb the ReLU after a norm (frn, evonorm-*), and report every replacement.

Importing ``bkn.rivals`` loads neither torch nor timm; its submodules do.
"""
