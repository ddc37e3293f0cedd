"""Fuzz harness for sip.framing.StreamFramer: any stream yields message octets, PING or
NEED_DATA, or raises a SipError; feeding it whole, cut at random points, or byte by byte
gives the same events and the same error; every framed message parses or raises SipError.

    python tests/fuzz/sip_framing.py -max_total_time=3600 [corpus dirs]   (see README.md)

Uses atheris (libFuzzer) when installed, else a bounded mutation loop (--no-atheris forces it).
"""

from __future__ import annotations

import sys

import _harness

atheris = _harness.start(include=["sip"], modules=["sip.framing", "sip.message"])

import _common


def test_one_input(data: bytes) -> None:
    _common.check_framing(data)


if __name__ == "__main__":
    sys.exit(_common.main(test_one_input, atheris))
