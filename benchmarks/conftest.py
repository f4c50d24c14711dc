"""pytest-benchmark suites: one file per stage (bench_<op>.py), collected from this folder only."""

collect_ignore_glob = ["results/*"]
