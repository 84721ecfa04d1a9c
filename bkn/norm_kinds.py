"""Facts about the norms, by name, without torch: which exist, which are grouped, which batch-dependent.

Both :mod:`bkn.norms` (the constructor, which imports torch) and :mod:`bkn.methods` (the
registry, which must import without torch: the report reads labels and colours from it)
need these facts. They live here, below both, so that neither imports the other for them:
``methods`` imports ``norms`` only lazily, where it builds a layer, and ``norms`` never
imports ``methods`` (an import cycle otherwise).
"""

# The micro-batch rivals built from timm's layers (bkn.rivals, docs/design.md §15): a network gets them by
# conversion only (bkn.convert), since they also change the convolutions or absorb the activation after a norm.
RIVAL_NORMS = ("gn-ws", "frn", "evonorm-b0", "evonorm-s0")
# Names accepted by bkn.norms.create, in the order bkn.norms.names() gives them.
NAMES = ("bn", "bkn", "brn", "syncbn", "gn", "ln", "in") + RIVAL_NORMS + ("mabn", "cbn")
# Norms that compute their statistics per group of ``group_size`` samples (ghost batches).
GROUPED_NORMS = ("bn", "bkn", "brn", "evonorm-b0", "mabn", "cbn")
# Norms whose training-mode statistics depend on other samples: the grouped ones, and SyncBN
# (the whole batch of every worker of a process group; it takes no group_size).
BATCH_DEPENDENT_NORMS = GROUPED_NORMS + ("syncbn",)
# Norms a network gets only through bkn.convert (not by building its norm layers one by one).
CONVERTED_NORMS = RIVAL_NORMS
