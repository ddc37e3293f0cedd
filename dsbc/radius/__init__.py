"""RADIUS dispatcher (SPEC section 8): auth and accounting relayed to the owning system.

``packet`` is the I/O-free codec, ``core`` the I/O-free dispatcher state, ``service``
the asyncio adapter; ``start_radius(cfg, store)`` is what the runner calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsbc.radius.service import RadiusService


async def start_radius(cfg: Any, store: Any) -> RadiusService:
    from dsbc.radius.service import start_radius as _start

    return await _start(cfg, store)


async def start_radius_emulator(name: str, host: str, auth_port: int, acct_port: int, secret: str) -> Any:
    from dsbc.emulator.radius_server import start_radius_emulator as _start

    return await _start(name, host, auth_port, acct_port, secret)


__all__ = ["start_radius", "start_radius_emulator"]
