"""``api-merge``: see benchmarks/system/api.py."""

from benchmarks.system.api import run_merge as run

__all__ = ["run"]
