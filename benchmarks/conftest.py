"""pytest-benchmark suites, one file per ``oodfast bench`` stage, named after it: bench_detect.py,
bench_ring.py, bench_aug.py, bench_step.py (step and end to end); bench_synthdrive.py times the data
generator. Run them with ``pytest benchmarks/ --benchmark-only``; results/ holds committed reports."""

collect_ignore_glob = ["results/*"]
