"""Fuzz harness for sip.framing.StreamFramer: any stream yields message octets, PING or
NEED_DATA, or raises a SipError; feeding it whole, cut at random points, or byte by byte
gives the same events and the same error; every framed message parses or raises SipError.

    python tests/fuzz/sip_framing.py -max_total_time=3600 [corpus dirs]   (see README.md)

Uses atheris (libFuzzer) when installed, else a bounded mutation loop (--no-atheris forces it).
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repo root
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

try:
    import atheris
except ImportError:  # atheris has no wheel for every Python / platform
    atheris = None

if atheris is not None and "--no-atheris" not in sys.argv:
    with atheris.instrument_imports(include=["sip"]):
        import sip.framing
        import sip.message  # noqa: F401

import _common


def test_one_input(data: bytes) -> None:
    _common.check_framing(data)


if __name__ == "__main__":
    sys.exit(_common.main(test_one_input, atheris))
