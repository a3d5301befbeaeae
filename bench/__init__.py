"""Benchmarks: `make bench` runs every `bench/bench_*.py` module's `run()`; each writes JSON under
bench/results/ and the numbers are quoted in docs/performance.md."""
