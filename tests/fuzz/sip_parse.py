"""Fuzz harness for sip.message.parse_message: any octets either parse into a SipMessage
or raise a SipError (h11's invariant), never IndexError, ValueError, UnicodeError...;
every accessor, the Editor and make_response keep the same promise on what parsed.

    python tests/fuzz/sip_parse.py -max_total_time=3600 [corpus dirs]   (see README.md)

Uses atheris (libFuzzer) when installed, else a bounded mutation loop (--no-atheris forces it).
"""

from __future__ import annotations

import sys

import _harness

atheris = _harness.start(
    include=["sip"], modules=["sip.errors", "sip.headers", "sip.message", "sip.uri"]
)

import _common


def test_one_input(data: bytes) -> None:
    _common.check_parse(data)


if __name__ == "__main__":
    sys.exit(_common.main(test_one_input, atheris))
