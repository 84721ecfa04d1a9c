"""The GPU check: ``python -m suites.gpu`` (``nox -s gpu``), one script for one call on a lent GPU machine.

Parts, in this order, each with its own time budget inside the whole run's (default 450 s, so
that the call fits in 8 minutes with the machine's start): ``bandwidth`` (a device copy),
``graph`` (a converted ResNet-18 training step replayed as a CUDA graph, equal to eager?),
``layer`` (every registry method against torch's BN, forward + backward, interleaved),
``network`` (ResNet-18 and the CIFAR ResNet step, eager and graphed, ratio to BN), ``tests``
(the CUDA tests under ``torch.cuda.set_sync_debug_mode("error")``) and ``asv`` (a CUDA subset
of the suites through asv installed offline from carried wheels). A part or item that runs out
of its budget is recorded as skipped, with why. Results: one tidy file
(:data:`bkn.probes.results.GPU`, ``results/gpu/gpu.parquet``) with ``meta.json`` and a log
beside it; ``--out DIR`` copies them (and the asv results as one archive) into ``DIR``.

``--device cpu --quick`` runs the same pipeline on the CPU with tiny shapes (graphs and the
CUDA-only parts skipped, saying why): what the fast test checks. ``--pack`` prepares what the
machine needs and cannot download (``.gpu/``: asv's wheels, a shallow clone for asv, the
commit). ``--import DIR`` takes what came back into ``results/gpu`` and ``.asv/results``.
The modules hold no asv benchmark (asv imports every module under ``suites/``). docs/gpu.md.
"""
