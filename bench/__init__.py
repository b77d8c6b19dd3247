"""Benchmarks: each prints figures next to a floor measured in the same run, and the ratio.

Run one with ``python -m bench NAME`` (``python -m bench`` lists them). Benchmarks never run in the test
suite: timings on shared machines are for people to judge, not for assertions.
"""
