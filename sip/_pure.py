"""Which build of the compiled modules runs: the compiled one (mypyc, see setup.py) or
the pure-Python source it is compiled from.  The compiled modules are the SIP core and
the API fast path (its classifier ``api_proxy.classify`` / ``apicall``, its route
``api_proxy.plan``, its head codec ``api_proxy.h1`` / ``h1relay``, its pools
``api_proxy.fastpool`` and its protocol ``api_proxy.fastpath``); ``sip`` and
``api_proxy`` both call ``install()`` when imported.

``DSBC_PURE_PYTHON=1`` (any value but ``0``, ``false``, ``no``, ``off`` or empty: see
``pure_requested``) imports the ``.py`` files even where the compiled modules are
installed next to them: the test suite keeps the pure-Python version tested that way
(tests/test_compiled.py), and an operator can rule the compiled build out when chasing a
problem.  A source file newer than its compiled module (a tree edited after
``pip install -e .``) is imported from source too, with a warning: a stale build never
runs.  ``compiled()`` says which one is in use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: the modules setup.py may compile, in any package under the repository root; add a
#: name here and setup.py compiles it, the stale check and the pure switch cover it
CORE_MODULES = (
    "sip.uri", "sip.headers", "sip.message", "sip.framing", "sip.proxy",
    "sip.ratelimit", "sip.scanner", "sip.admission", "sip.peers", "sip.transport",
    "sip.value", "sip.flow", "sip.health",
    "api_proxy.apicall", "api_proxy.classify", "api_proxy.plan",
    "api_proxy.h1", "api_proxy.h1relay", "api_proxy.fastpool", "api_proxy.fastpath",
)


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` file of each core module ahead of its extension module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in CORE_MODULES or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for folder in path:
            source = os.path.join(folder, leaf + ".py")
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def pure_requested() -> bool:
    """``DSBC_PURE_PYTHON`` asks for the pure-Python modules: set, and not one of the
    usual spellings of off (an operator writes ``DSBC_PURE_PYTHON=0`` in a unit file to
    mean the compiled core)."""
    value = os.environ.get("DSBC_PURE_PYTHON", "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def _stale_module(root: str) -> str | None:
    """The first core module (``sip/uri.py``) under ``root`` whose source is newer than its
    compiled file, if any.  The compiled modules call each other directly, so one stale
    module means none can be used."""
    for name in CORE_MODULES:
        package, _, leaf = name.rpartition(".")
        folder = os.path.join(root, *package.split("."))
        source = os.path.join(folder, leaf + ".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            built = os.path.join(folder, leaf + suffix)
            if os.path.exists(built) and os.path.exists(source):
                if os.path.getmtime(built) + 1 < os.path.getmtime(source):
                    return os.path.join(*package.split("."), leaf + ".py")
                break
    return None


def install() -> None:
    if any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        return
    if not pure_requested():
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        stale = _stale_module(root)
        if stale is None:
            return
        print(f"dsbc: {stale} is newer than its compiled build: using the pure-Python "
              "modules (rebuild with pip install -e .)", file=sys.stderr)
    sys.meta_path.insert(0, _SourceFirst())


def no_c_toolchain() -> str | None:
    """Why this interpreter cannot build the compiled core (no C compiler, no Python.h),
    or None when it can.  setup.py asks before compiling; the tests ask what to expect."""
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        return f"no C compiler ({cc})"
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        return "no Python.h (install the python3-dev package)"
    return None


def compiled() -> dict[str, bool]:
    """For each compiled module: is the compiled build the one imported?"""
    out: dict[str, bool] = {}
    for name in CORE_MODULES:
        module = importlib.import_module(name)
        out[name] = not (module.__file__ or "").endswith(".py")
    return out


def build() -> str:
    """Which core runs, for `dsbc --version` and the start of `dsbc run`: ``compiled
    (mypyc)``, ``pure Python`` or ``mixed: compiled <modules>``."""
    flags = {}  # found, not imported: the master process of `dsbc run` never loads the core
    for name in CORE_MODULES:
        spec = importlib.util.find_spec(name)
        flags[name] = spec is not None and not (spec.origin or "").endswith(".py")
    if all(flags.values()):
        return "compiled (mypyc)"
    if not any(flags.values()):
        return "pure Python"
    return "mixed: compiled " + ", ".join(k for k, v in flags.items() if v)
