"""Build hook: compile the hot paths (the SIP core, the API fast path) with mypyc when a C
compiler is at hand.

Metadata lives in pyproject.toml; this file only adds the optional compiled modules.
The compiled modules are the same source as the pure-Python ones (mypyc compiles the
type-annotated modules listed in ``COMPILED``), so behaviour is identical and the
pure-Python code stays the reference: ``DSBC_PURE_PYTHON=1`` at run time imports the
``.py`` files even when the compiled ones are installed (see ``sip/_pure.py``), and the
test suite runs the codec and proxy tests that way too (tests/test_compiled.py).

``DSBC_PURE_PYTHON=1`` at build time, or no C compiler / Python headers, installs the
pure-Python modules only; dsbc works the same, slower (``dsbc --version`` tells which).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sip._pure import (  # the one list of compiled modules
    CORE_MODULES,
    no_c_toolchain,
    pure_requested,
)

#: the modules every SIP message and fast-path API request goes through (sip/_pure.py)
COMPILED = [name.replace(".", "/") + ".py" for name in CORE_MODULES]


def _can_compile() -> str | None:
    """None when a C build can work here, else why not."""
    if pure_requested():
        return "DSBC_PURE_PYTHON is set"
    missing = no_c_toolchain()
    if missing:
        return missing
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    return None


def _pure_only(why: str) -> None:
    print(f"dsbc: installing the pure-Python modules only: {why}", file=sys.stderr)


def ext_modules() -> list[object]:
    why_not = _can_compile()
    if why_not:
        _pure_only(why_not)
        return []
    from mypyc.build import mypycify

    try:
        # pip builds in an isolated environment without the runtime dependencies (aiohttp):
        # their classes are then Any to the type check, and a module that subclasses one
        # (api_proxy/server.py, which the API fast path's annotations name) must still pass
        return list(mypycify(["--allow-subclassing-any", *COMPILED], opt_level="3", debug_level="0"))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc exits on a type error
        _pure_only(f"mypyc failed ({exc})")
        return []


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """A failed C build installs the pure-Python modules instead of failing the install; no
    half-built module is left behind (the compiled modules call each other directly)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - compiler errors come in many classes
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            _pure_only(f"the C build failed ({exc})")


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
