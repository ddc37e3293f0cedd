"""The compiled modules (mypyc, setup.py) and the pure-Python ones behave the same.

The normal test run uses whatever the install built (compiled where a C compiler was
found).  Here the tests of the compiled modules run again with ``DSBC_PURE_PYTHON=1``,
which imports the ``.py`` sources instead, so both builds pass the same SIP codec,
framing, proxy and RFC 4475 tests, and the same API fast-path tests (the classifier
``api_proxy.classify`` / ``apicall`` with its fuzz invariant, the head codec
``api_proxy.h1`` / ``h1relay`` with its regex-equivalence properties, the pools
``fastpool`` and the protocol ``fastpath``: faults, timeouts, retries, streaming with
flow control both ways, TLS), the answer-head rewriting ``h1relay`` and the SIP
transport ``sip.transport`` (its flows, hand-overs and listeners).
tests/test_compiled_diff.py runs both builds side by side on the same inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sip._pure import no_c_toolchain, pure_requested

ROOT = Path(__file__).resolve().parent.parent
#: the tests of the modules setup.py compiles (the SIP ones and the API classifier's are
#: I/O-free; the API fast-path ones go through loopback sockets, and compare with the
#: aiohttp path)
CORE_TESTS = [
    "tests/test_sip_codec.py",
    "tests/test_sip_uri.py",
    "tests/test_sip_fastpaths.py",
    "tests/test_sip_badinput.py",
    "tests/test_framing.py",
    "tests/test_proxy_core.py",
    "tests/test_rfc4475_codec.py",
    "tests/test_rfc4475_proxy.py",
    "tests/test_security_units.py",
    "tests/test_api_classify.py",
    "tests/test_api_h1.py",
    "tests/test_api_fastpath.py",
    "tests/test_api_fastpath_badinput.py",
    "tests/test_api_streaming.py",
    "tests/test_api_redirects.py",
    "tests/test_transport_flows.py",
]


def _env(pure: bool, value: str = "1") -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DSBC_PURE_PYTHON", None)
    if pure:
        env["DSBC_PURE_PYTHON"] = value
    return env


def _compiled(pure: bool, value: str = "1") -> dict[str, bool]:
    code = "import json; from sip._pure import compiled; print(json.dumps(compiled()))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(pure, value), capture_output=True,
        text=True, timeout=60, check=True,
    )
    result: dict[str, bool] = json.loads(out.stdout)
    return result


def test_pure_switch_imports_the_sources() -> None:
    assert not any(_compiled(pure=True).values())
    assert not any(_compiled(pure=True, value="yes").values())


@pytest.mark.skipif(no_c_toolchain() is not None or pure_requested(),
                    reason="no C compiler here: the install is pure Python")
def test_pure_switch_set_to_off_keeps_the_compiled_core() -> None:
    """Found by an audit: ``DSBC_PURE_PYTHON=0`` (an operator's "off" in a unit file) ran
    the pure-Python core, about 2.5x slower, since any value counted as on."""
    for off in ("0", "false", "no", "off", ""):
        assert all(_compiled(pure=True, value=off).values()), off


@pytest.mark.skipif(no_c_toolchain() is not None or pure_requested(),
                    reason="no C compiler here: the install is pure Python")
def test_install_built_the_compiled_core() -> None:
    """scripts/test.sh installs with a compiler at hand: every core module is compiled."""
    flags = _compiled(pure=False)
    assert all(flags.values()), f"not compiled: {[k for k, v in flags.items() if not v]}"


def test_version_names_the_build() -> None:
    for pure, expect in ((True, "API fast path: pure Python"), (False, "API fast path: ")):
        out = subprocess.run(
            [sys.executable, "-c", "from dsbc.cli import main; main(['--version'])"],
            cwd=ROOT, env=_env(pure), capture_output=True, text=True, timeout=60, check=False,
        )
        assert out.returncode == 0, out.stderr
        assert expect in out.stdout


def test_pure_python_core_passes_the_core_tests() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "-o", "addopts=", *CORE_TESTS],
        cwd=ROOT, env=_env(pure=True), capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


def test_a_stale_build_is_not_used(tmp_path: Path) -> None:
    """A source edited after the build wins over the compiled file (a developer's tree)."""
    from importlib.machinery import EXTENSION_SUFFIXES

    from sip._pure import _stale_module

    for package, leaf in (("sip", "uri"), ("sip", "message"), ("api_proxy", "h1")):
        folder = tmp_path / package
        folder.mkdir(exist_ok=True)
        (folder / f"{leaf}.py").write_text("")
        built = folder / f"{leaf}{EXTENSION_SUFFIXES[0]}"
        built.write_text("")
        os.utime(built, (1_000_000, 1_000_000))
        os.utime(folder / f"{leaf}.py", (1_000_000, 1_000_000))
    assert _stale_module(str(tmp_path)) is None
    os.utime(tmp_path / "api_proxy" / "h1.py", (1_000_100, 1_000_100))
    assert _stale_module(str(tmp_path)) == os.path.join("api_proxy", "h1.py")
    os.utime(tmp_path / "sip" / "message.py", (1_000_100, 1_000_100))
    assert _stale_module(str(tmp_path)) == os.path.join("sip", "message.py")


def test_the_compiled_modules_pass_the_type_check_of_an_isolated_build(tmp_path: Path) -> None:
    """pip builds in an environment holding only the build requirements: aiohttp and the
    other runtime dependencies are then Any to mypyc's type check, and code that passes
    `mypy` in a full environment can fail there, which makes `pip install .` install the
    pure-Python modules (found at the end of a session: two lines of api_proxy did)."""
    pytest.importorskip("mypy")
    import venv

    import msgspec

    from sip._pure import CORE_MODULES

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    purelib = Path(subprocess.run([str(env / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "msgspec").symlink_to(Path(msgspec.__file__).parent)  # a build requirement
    files = [name.replace(".", "/") + ".py" for name in CORE_MODULES]
    r = subprocess.run([sys.executable, "-m", "mypy", "--python-executable", str(env / "bin" / "python"),
                        "--allow-subclassing-any", "--cache-dir", str(tmp_path / "cache"), *files],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
