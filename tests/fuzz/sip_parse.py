"""Fuzz harness for sip.message.parse_message: any octets either parse into a SipMessage
or raise a SipError (h11's invariant), never IndexError, ValueError, UnicodeError...;
every accessor, the Editor and make_response keep the same promise on what parsed.

    python tests/fuzz/sip_parse.py -max_total_time=3600 [corpus dirs]   (see README.md)

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
        import sip.errors
        import sip.headers
        import sip.message
        import sip.uri  # noqa: F401

import _common


def test_one_input(data: bytes) -> None:
    _common.check_parse(data)


if __name__ == "__main__":
    sys.exit(_common.main(test_one_input, atheris))
