"""Run each fuzz harness in tests/fuzz/ for about 3 seconds (CI smoke run).

With atheris installed the harness runs under libFuzzer; without it (or with
--no-atheris) it runs its bounded mutation loop.  Either way a failing input makes the
harness exit non-zero and leaves a crash-* file, shown in the assertion message.
The long run is documented in tests/fuzz/README.md.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent / "fuzz"
HARNESSES = ["sip_parse.py", "sip_framing.py"]
SECONDS = 3


def run(
    harness: str, tmp_path: Path, *extra: str, seeds: str = "corpus"
) -> subprocess.CompletedProcess[str]:
    """Run ``harness`` on its seed corpus ``tests/fuzz/<seeds>`` for SECONDS; it must exit 0
    (tests/test_fuzz_smoke_aaa.py runs its harnesses through this too)."""
    corpus = tmp_path / "corpus"  # libFuzzer writes new inputs here, not into the repo
    corpus.mkdir(exist_ok=True)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir(exist_ok=True)
    args = [
        sys.executable,
        str(FUZZ / harness),
        str(corpus),
        str(FUZZ / seeds),
        f"-max_total_time={SECONDS}",
        f"-artifact_prefix={artifacts}/",
        "-seed=1",
        *extra,
    ]
    proc = subprocess.run(
        args, capture_output=True, text=True, timeout=SECONDS * 20 + 60, check=False
    )
    crashes = sorted(artifacts.glob("crash-*"))
    detail = "\n".join(f"{p.name}: {p.read_bytes()[:300]!r}" for p in crashes)
    assert proc.returncode == 0, f"{harness} failed\n{detail}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_clean(harness: str, tmp_path: Path) -> None:
    run(harness, tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="fallback already ran above"
)
@pytest.mark.parametrize("harness", HARNESSES)
def test_fallback_loop_runs_clean(harness: str, tmp_path: Path) -> None:
    # keep the no-atheris path working where atheris is installed: a short bounded run
    proc = run(harness, tmp_path, "--no-atheris", "-runs=300")
    assert "no failure" in proc.stderr


def test_seed_corpus_is_there() -> None:
    seeds = list((FUZZ / "corpus").glob("*.dat"))
    assert len(seeds) >= 49
    assert shutil.which(sys.executable)
