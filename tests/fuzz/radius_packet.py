"""Fuzz harness for RADIUS (dsbc.radius.packet and the dispatcher core dsbc.radius.core): any input is handled or
raises the package's own error, nothing else (the invariants are in _aaa.py).

    python tests/fuzz/radius_packet.py -max_total_time=3600 [corpus dirs]   (see README.md)

Uses atheris (libFuzzer) when installed, else a bounded mutation loop (--no-atheris forces it).
Seeds: tests/fuzz/corpus-radius/ (made by make_aaa_corpus.py).
"""

from __future__ import annotations

import sys

import _harness

atheris = _harness.start(include=["dsbc.radius"], modules=["_aaa"])

import _aaa
import _common

_common.SEED_DIR = _aaa.HERE / "corpus-radius"  # this harness's seeds, not the SIP ones


def test_one_input(data: bytes) -> None:
    _aaa.check_radius(data)


if __name__ == "__main__":
    sys.exit(_common.main(test_one_input, atheris))
