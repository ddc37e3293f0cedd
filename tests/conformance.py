"""Where the shared conformance data lives: ``shared/`` beside the checkout (as CI lays it),
else the workplace's copy."""

from __future__ import annotations

import pathlib

_BESIDE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "conformance" / "rfc4475"
RFC4475 = _BESIDE if _BESIDE.is_dir() else pathlib.Path("/work/shared/conformance/rfc4475")
