"""Layer rules from docs/HACKING.md, checked on the source (ast), not by importing it.

* Protocol cores do no I/O: no module in ``sip/`` except ``sip/transport*.py``, and not
  ``api_proxy/classify.py``, imports asyncio, socket, uvloop or selectors.
* ``sip/`` and ``api_proxy/`` never import ``dsbc`` (dsbc wires them together), and ``sip/``
  never imports ``api_proxy``.

Imports under ``if TYPE_CHECKING:`` do not count; ``importlib.import_module("x")`` and
``__import__("x")`` with a literal name do.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IO_MODULES = frozenset({"asyncio", "socket", "uvloop", "selectors"})


def modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def core_modules() -> list[pathlib.Path]:
    sip = [p for p in modules("sip") if not p.name.startswith("transport")]
    classify = ROOT / "api_proxy" / "classify.py"
    return sip + ([classify] if classify.exists() else [])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) for every runtime import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = list(path.relative_to(root).parts[:-1])
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                name = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # from . import x  -> package.x
                    found.extend((node.lineno, ".".join([*base, a.name])) for a in node.names)
                    return
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call):
            f = node.func
            fname = (
                f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            )
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def test_there_are_modules_to_check() -> None:
    assert any(p.name == "message.py" for p in core_modules())


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_modules_do_no_io(path: pathlib.Path) -> None:
    bad = [(line, name) for line, name in imported(path) if top(name) in IO_MODULES]
    assert not bad, (
        f"{path.relative_to(ROOT)} imports I/O modules: {bad} (only sip/transport*.py may)"
    )


@pytest.mark.parametrize(
    "path", modules("sip") + modules("api_proxy"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_sip_and_api_proxy_never_import_dsbc(path: pathlib.Path) -> None:
    bad = [(line, name) for line, name in imported(path) if top(name) == "dsbc"]
    assert not bad, f"{path.relative_to(ROOT)} imports dsbc: {bad}"


@pytest.mark.parametrize("path", modules("sip"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sip_never_imports_api_proxy(path: pathlib.Path) -> None:
    bad = [(line, name) for line, name in imported(path) if top(name) == "api_proxy"]
    assert not bad, f"{path.relative_to(ROOT)} imports api_proxy: {bad}"


# --- the checker itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import asyncio", "asyncio"),
        ("import asyncio.events as ev", "asyncio"),
        ("from socket import socket", "socket"),
        ("def f():\n    import uvloop", "uvloop"),
        ("import importlib\nimportlib.import_module('selectors')", "selectors"),
        ("__import__('socket')", "socket"),
        ("from dsbc.config import Config", "dsbc"),
        ("from .. import dsbc", "dsbc"),
        ("from ..dsbc import x", "dsbc"),
        ("try:\n    import uvloop\nexcept ImportError:\n    pass", "uvloop"),
    ],
)
def test_checker_finds_imports(tmp_path: pathlib.Path, source: str, expected: str) -> None:
    (tmp_path / "sip").mkdir()
    mod = tmp_path / "sip" / "core.py"
    mod.write_text(source)
    assert expected in {top(n) for _, n in imported(mod, tmp_path)}


def test_checker_ignores_type_checking_imports(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sip").mkdir()
    mod = tmp_path / "sip" / "core.py"
    mod.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\nimport re\n"
    )
    assert {top(n) for _, n in imported(mod, tmp_path)} == {"typing", "re"}
    mod.write_text("from . import message\nfrom .uri import parse_uri\nfrom ..api_proxy import x\n")
    assert {n for _, n in imported(mod, tmp_path)} == {"sip.message", "sip.uri", "api_proxy"}
