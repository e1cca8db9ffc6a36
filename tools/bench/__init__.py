"""Benchmarks whose figures are recorded in ``docs/BENCHMARKS.md``."""
