"""What the benchmark modules share; it defines no benchmark.

One module per job:

=============== =====================================================================
``process``     the benchmark process: a fixed torch thread count, and the imports the
                fork server does once for all the forked benchmark processes
``matrix``      the parameter values (named by :mod:`bkn.probes.results`), ``skip``, and the
                rules that prune the matrix on the CPU
``decode``      parameter strings -> torch objects (shape, device, dtype, memory format)
``timing``      the one-case-per-process cache, asv's timing settings, synchronisation
``prior``       :class:`~suites.harness.prior.KalmanPrior`: a BKN layer's prior as a network
                propagates it
``layer``       one normalization layer on one input (:class:`~suites.harness.layer.LayerCase`)
``tensor``      the copy reference's tensors (:class:`~suites.harness.tensor.TensorCase`)
``network``     one training step of a whole network (:class:`~suites.harness.network.NetworkCase`)
``memory``      the bytes autograd saves for the backward
``ddp``         one data-parallel training step over K processes (:class:`~suites.harness.ddp.DDPCase`,
                rank 0) and the peer processes it starts
=============== =====================================================================

How asv sees this package: discovery (``asv_runner.discovery``) imports every module
under ``benchmark_dir``, subpackages and underscore names included, and scans each
module's public classes and functions for benchmark names (``time_``, ``peakmem_``,
``mem_``, ``track_``, ``timeraw_`` and ``Time*``, ``PeakMem*``, ``Mem*``, ``Track*``,
``Timeraw*`` methods or functions). A leading underscore on a module name hides nothing,
so the rule here is: no function or method in this package has such a name
(``tests/test_suites.py`` runs asv's own discovery and checks that every benchmark it
finds lives in a ``bench_*`` or ``track_*`` module). A benchmark module must also not
bind, at module level, the names asv reads as per-benchmark settings (``setup``,
``teardown``, ``setup_cache``, ``params``, ``param_names``, ``timeout``, ``version``,
...): asv takes them from the module when the class lacks them.
"""
