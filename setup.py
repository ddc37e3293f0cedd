"""Build hook: compile the SIP hot path with mypyc when a C compiler is at hand.

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
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sip._pure import CORE_MODULES  # the one list of compiled modules

#: the modules every SIP message goes through, in dependency order
COMPILED = [name.replace(".", "/") + ".py" for name in CORE_MODULES]


def _can_compile() -> str | None:
    """None when a C build can work here, else why not."""
    if os.environ.get("DSBC_PURE_PYTHON"):
        return "DSBC_PURE_PYTHON is set"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        return f"no C compiler ({cc})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python.h (install the python3-dev package)"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    return None


def ext_modules() -> list[object]:
    why_not = _can_compile()
    if why_not:
        print(f"dsbc: installing the pure-Python SIP core only: {why_not}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", debug_level="0"))


setup(ext_modules=ext_modules())
