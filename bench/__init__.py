"""Benchmarks: run on demand (``python -m bench NAME``); figures next to a floor measured in the same run."""
