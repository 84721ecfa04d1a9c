"""asv benchmark suites of bkn-suite (``benchmark_dir`` of asv.conf.json); see README.md here."""
