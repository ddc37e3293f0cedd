"""deploy/dsbc.example.toml documents every key of the schema, and is itself valid."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from dsbc.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "dsbc.example.toml"


def _keys(struct: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for f in msgspec.structs.fields(struct):
        if f.name == "path" and struct is Config:
            continue
        name = f"{prefix}{f.name}"
        t = f.type
        inner = getattr(t, "__args__", (None,))[0] if getattr(t, "__origin__", None) is list else None
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            out |= _keys(t, name + ".")
        elif isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            out |= _keys(inner, name + "[].")
        else:
            out.add(name)
    return out


def _present(doc: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and k not in ("realm_paths",):
                out |= _present(v, name + ".")
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    out |= _present(item, name + "[].")
            else:
                out.add(name)
    return out


def test_example_is_valid() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.systems.target.name == "MR115"


def test_example_documents_every_key() -> None:
    doc = tomllib.loads(EXAMPLE.read_text())
    missing = _keys(Config) - _present(doc)
    assert not missing, f"keys missing from {EXAMPLE.name}: {sorted(missing)}"
