"""Benchmarks: each prints figures next to a floor measured in the same run (see shared TARGETS.md)."""
