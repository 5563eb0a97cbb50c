"""Benchmarks of ../shared/BENCH.md: workloads, peers, physical floor, the one-call GPU script."""
