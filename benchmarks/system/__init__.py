"""Whole-system benchmark scenarios: dsbc and its C peer, one after the other, on loopback.

``python -m benchmarks run`` drives them (see benchmarks/README.md); each scenario module
exposes ``run(ctx) -> list[Row]`` and the smoke test calls them with tiny parameters.
"""
