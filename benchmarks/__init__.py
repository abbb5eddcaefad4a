"""Benchmarks: ``python -m benchmarks <suite> [...] [--quick]``. See harness.py for the method."""
