"""dsbc benchmarks: pytest-benchmark suites for the hot functions (``test_bench_*.py``) and
whole-system runs against Kamailio, nginx and FreeRADIUS (``python -m benchmarks run``).

See benchmarks/README.md.
"""
