"""Shipped fingerprints (one JSON per device, measured there) and their JSON Schema.

This package holds data only; ``sparsec.fingerprint`` reads it. Names are file stems:
``h200``, ``h100``, ``cpu``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def shipped_dir() -> Path:
    """The directory holding the shipped fingerprint files."""
    return _HERE


def schema_path() -> Path:
    """Path of the ``sparsec.fingerprint/1`` JSON Schema."""
    return _HERE / "schema.json"


def shipped_names() -> list[str]:
    """Names of the shipped fingerprints, sorted."""
    return sorted(p.stem for p in _HERE.glob("*.json") if p.name != "schema.json")


def shipped_path(name: str) -> Path | None:
    """Path of the shipped fingerprint called ``name``, or None if none is shipped."""
    p = _HERE / f"{name}.json"
    return p if name != "schema" and p.is_file() else None
