"""Diameter dispatcher (SPEC section 8): credit control routed by subscriber to the owning system.

``codec`` is the I/O-free RFC 6733 codec, ``routing`` the I/O-free dispatcher state,
``peer`` the TCP connections (CER/CEA, DWR/DWA, DPR/DPA), ``service`` the wiring;
``start_diameter(cfg, store)`` is what the runner calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsbc.diameter.service import DiameterService


async def start_diameter(cfg: Any, store: Any) -> DiameterService:
    from dsbc.diameter.service import start_diameter as _start

    return await _start(cfg, store)


__all__ = ["start_diameter"]
