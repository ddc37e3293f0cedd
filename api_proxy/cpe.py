"""CPE identities in provisioning requests: MACs in file names, TR-069 Inform DeviceIds.

Pure functions over strings and bytes.  Phones and gateways fetch their configuration by
MAC (``0004f2a1b2c3.cfg``, ``cfg000b82a1b2c3.xml``, ``SEP001122334455.cnf.xml``,
``?mac=00:11:22:33:44:55``); a TR-069 CPE opens its CWMP session with an ``Inform``
naming its DeviceId.  Both give a ``cpe`` identity: 12 lowercase hex digits.

The Inform is read with bounded regular expressions, not an XML parser: the body is
untrusted, small (capped by the server before it gets here) and only three elements
matter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

_HEX12 = re.compile(r"^[0-9a-f]{12}$")
_SEPARATORS = re.compile(r"[\s:\-\.]")

#: Default file-name and query patterns; group 1 is the MAC.
DEFAULT_PATTERNS: tuple[str, ...] = (
    # ?mac=0004f2a1b2c3, &MAC=00:04:f2:a1:b2:c3, mac_address=00-04-...
    r"(?i)[?&](?:mac|mac_?addr(?:ess)?|device_?mac)=([0-9a-f]{2}(?:[:\-.]?[0-9a-f]{2}){5})(?:&|$)",
    # a file named by MAC, with the usual vendor prefixes and suffixes
    r"(?i)/(?:cfg|spa|sep|snom[0-9a-z]*-|yealink-|gs_|aastra-|mitel-)?([0-9a-f]{12})"
    r"(?:[-_.][\w.\-]*)?(?:\?|$)",
    # a path segment that is a MAC written with separators
    r"(?i)/([0-9a-f]{2}(?:[:\-][0-9a-f]{2}){5})(?:/|\?|$)",
)


class CpeError(ValueError):
    """A configured pattern that cannot be used (local misuse: raised at start)."""


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    out = []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as exc:
            raise CpeError(f"cpe pattern {p!r}: {exc}") from None
        if rx.groups < 1:
            raise CpeError(f"cpe pattern {p!r}: needs a group around the MAC")
        out.append(rx)
    return tuple(out)


DEFAULT_COMPILED = compile_patterns(DEFAULT_PATTERNS)


def normalise_mac(text: str) -> str | None:
    v = _SEPARATORS.sub("", text).lower()
    return v if _HEX12.match(v) else None


def mac_in_target(target: str, patterns: tuple[re.Pattern[str], ...]) -> str | None:
    """The MAC named by a request target (path and query), or None."""
    if len(target) > 8192:
        target = target[:8192]
    try:
        text = unquote(target, errors="replace")
    except (ValueError, TypeError):
        text = target
    for rx in patterns:
        m = rx.search(text)
        if m:
            mac = normalise_mac(m.group(1))
            if mac:
                return mac
    return None


# --- TR-069 / CWMP -------------------------------------------------------------------------

_TAG = r"(?:[A-Za-z_][\w.\-]*:)?"
_INFORM = re.compile(rb"<" + _TAG.encode() + rb"Inform[\s>/]")
_DEVICE_ID = re.compile(
    rb"<" + _TAG.encode() + rb"DeviceId\b[^>]{0,512}>(.{0,4096}?)</" + _TAG.encode() + rb"DeviceId\s*>",
    re.S,
)
_FIELD = {
    name: re.compile(rb"<" + _TAG.encode() + name.encode() + rb"\b[^>]{0,256}>([^<]{0,256})<")
    for name in ("SerialNumber", "OUI", "ProductClass", "Manufacturer")
}
_MAC_PARAM = re.compile(
    rb"<" + _TAG.encode() + rb"Name\b[^>]{0,256}>[^<]{0,256}MACAddress\s*</" + _TAG.encode()
    + rb"Name\s*>\s*<" + _TAG.encode() + rb"Value\b[^>]{0,256}>([^<]{0,64})<",
)


def is_inform(body: bytes) -> bool:
    return bool(body) and _INFORM.search(body) is not None


def inform_device(body: bytes) -> dict[str, str]:
    """The DeviceId fields of a CWMP Inform (empty when the body holds none)."""
    m = _DEVICE_ID.search(body)
    if not m:
        return {}
    inner = m.group(1)
    out: dict[str, str] = {}
    for name, rx in _FIELD.items():
        f = rx.search(inner)
        if f:
            out[name] = f.group(1).decode("utf-8", "replace").strip()
    return out


def inform_macs(body: bytes) -> list[str]:
    """Candidate MACs of the device sending an Inform, best first.

    The SerialNumber when it is a MAC (most gateways), then any ``...MACAddress``
    parameter the Inform carries.  Vendors whose serial is not the MAC are provisioned
    by adding the serial's MAC parameter to the Inform's ParameterList (ACS-side)."""
    macs: list[str] = []
    dev = inform_device(body)
    serial = dev.get("SerialNumber", "")
    mac = normalise_mac(serial) if serial else None
    if mac:
        macs.append(mac)
    for pm in _MAC_PARAM.finditer(body[:65536]):
        mac = normalise_mac(pm.group(1).decode("ascii", "replace"))
        if mac and mac not in macs:
            macs.append(mac)
        if len(macs) >= 4:
            break
    return macs
