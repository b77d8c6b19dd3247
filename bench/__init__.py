"""Benchmarks: figures and ratios against a floor measured in the same run (not part of the test suite)."""
