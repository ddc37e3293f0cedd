"""CI smoke run of the RADIUS, Diameter and API-classifier fuzz harnesses (a few seconds
each), plus the regression inputs fuzzing found, replayed as plain tests.

With atheris installed the harnesses run under libFuzzer, otherwise their bounded
mutation loop; a failing input makes the harness exit non-zero and leaves a crash-*
file, shown in the assertion message.  Long runs: tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_fuzz_smoke import run as run_harness

FUZZ = Path(__file__).resolve().parent / "fuzz"
HARNESSES = {
    "radius_packet.py": "corpus-radius",
    "diameter_codec.py": "corpus-diameter",
    "api_classify.py": "corpus-api",
}

sys.path.insert(0, str(FUZZ))
import _aaa


def run(harness: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_harness(harness, tmp_path, *extra, seeds=HARNESSES[harness])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_harness_runs_clean(harness: str, tmp_path: Path) -> None:
    run(harness, tmp_path)


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="the fallback loop already ran above"
)
@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_fallback_loop_runs_clean(harness: str, tmp_path: Path) -> None:
    proc = run(harness, tmp_path, "--no-atheris", "-runs=300")
    assert "no failure" in proc.stderr


@pytest.mark.parametrize("corpus", sorted(HARNESSES.values()))
def test_seed_corpus_passes_the_invariants(corpus: str) -> None:
    check = {
        "corpus-radius": _aaa.check_radius,
        "corpus-diameter": _aaa.check_diameter,
        "corpus-api": _aaa.check_api,
    }[corpus]
    seeds = sorted((FUZZ / corpus).glob("*.dat"))
    assert len(seeds) >= 10
    for p in seeds:
        check(p.read_bytes())


def test_harnesses_reach_routing_and_answers() -> None:
    """The seeds are signed for the harness's secrets, so fuzzing starts deep in the cores."""
    from dsbc.radius.core import RadiusCore

    answered = []
    orig = RadiusCore.handle_answer

    def spy(self: RadiusCore, *a: object) -> list[object]:
        out = orig(self, *a)  # type: ignore[arg-type]
        answered.extend(out)
        return out  # type: ignore[return-value]

    RadiusCore.handle_answer = spy  # type: ignore[method-assign]
    try:
        for p in sorted((FUZZ / "corpus-radius").glob("*.dat")):
            _aaa.check_radius(p.read_bytes())
    finally:
        RadiusCore.handle_answer = orig  # type: ignore[method-assign]
    assert answered, "no RADIUS seed made it through request routing and the answer path"
