"""The start every fuzz harness script shares: put the repository root on ``sys.path``,
import atheris if it is installed, and import the harness's modules under
``atheris.instrument_imports`` (unless ``--no-atheris``) so that libFuzzer's coverage
sees the code under test.

This module imports nothing under test itself: a harness imports it first, calls
:func:`start`, and only then imports ``_common`` (which imports ``sip``).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def start(include: list[str], modules: list[str]) -> Any:
    """Import ``modules``, instrumenting the packages in ``include`` when atheris is in use;
    return the atheris module, or None when it is not installed."""
    try:
        import atheris
    except ImportError:  # atheris has no wheel for every Python / platform
        atheris = None
    if atheris is not None and "--no-atheris" not in sys.argv:
        # libFuzzer's coverage comes from instrumented Python bytecode: the compiled SIP
        # core has none, so a guided run fuzzes the pure-Python core (the same source).
        # DSBC_FUZZ_COMPILED=1 fuzzes the compiled build instead (crashes only, unguided).
        if not os.environ.get("DSBC_FUZZ_COMPILED"):
            os.environ.setdefault("DSBC_PURE_PYTHON", "1")
        with atheris.instrument_imports(include=include):
            for name in modules:
                importlib.import_module(name)
    else:
        for name in modules:
            importlib.import_module(name)
    return atheris
