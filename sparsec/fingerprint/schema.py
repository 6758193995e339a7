"""Validate a fingerprint against ``fingerprints/schema.json`` and name the first bad field.

jsonschema is not a dependency, so this implements the subset of JSON Schema the fingerprint
schema uses: ``type`` (one or a list), ``const``, ``enum``, ``required``, ``properties``,
``additionalProperties`` (bool or schema), ``propertyNames``, ``items``, ``minimum``,
``maximum``, ``exclusiveMinimum``, ``minLength`` and local ``$ref`` into ``$defs``. A keyword
outside that subset in the schema is an error, so the schema cannot silently ask for more than
is checked. Rules JSON Schema cannot say simply (which parameters each family's entries carry)
are checked in code after the schema.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

from sparsec.formats import FAMILIES

__all__ = ["SchemaViolation", "load_schema", "validate", "validate_fingerprint", "FAMILY_PARAMS"]

SCHEMA_ID = "sparsec.fingerprint/1"

# The parameters every kernel entry of a family must carry (and no others).
FAMILY_PARAMS: dict[str, tuple[str, ...]] = {
    family: tuple(cls.example().record()) for family, cls in FAMILIES.items()
}
_ALL_PARAMS = {p for ps in FAMILY_PARAMS.values() for p in ps}

_KNOWN_KEYWORDS = {
    "$schema", "$id", "$defs", "$ref", "title", "description", "type", "const", "enum",
    "required", "properties", "additionalProperties", "propertyNames", "items", "minimum",
    "maximum", "exclusiveMinimum", "minLength",
}


class SchemaViolation(ValueError):
    """A document does not follow the schema; ``where`` is the JSON path of the bad field."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The shipped schema (fingerprints/schema.json inside the installed package)."""
    from sparsec.fingerprints import schema_path

    return json.loads(Path(schema_path()).read_text())


def _type_ok(value, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise ValueError(f"schema uses unsupported type {name!r}")


def _child(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    if isinstance(key, str) and key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


def validate(value, schema: dict, root: dict | None = None, where: str = "") -> None:
    """Raise SchemaViolation at the first field of ``value`` that ``schema`` does not allow."""
    root = root if root is not None else schema
    here = where or "(document)"
    unknown = set(schema) - _KNOWN_KEYWORDS
    if unknown:
        raise ValueError(f"schema at {here} uses unsupported keywords {sorted(unknown)}")
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"schema at {here} has non-local $ref {ref!r}")
        validate(value, root["$defs"][ref[len("#/$defs/"):]], root, where)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, t) for t in types):
            raise SchemaViolation(here, f"expected {' or '.join(types)}, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaViolation(here, f"must be a finite number, got {value}")
    if "const" in schema and value != schema["const"]:
        raise SchemaViolation(here, f"must be {json.dumps(schema['const'])}, got {_describe(value)}")
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        raise SchemaViolation(here, f"must be one of {allowed}, got {_describe(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(here, f"must be >= {schema['minimum']}, got {value}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(here, f"must be <= {schema['maximum']}, got {value}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise SchemaViolation(here, f"must be > {schema['exclusiveMinimum']}, got {value}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        raise SchemaViolation(here, "must not be empty")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                raise SchemaViolation(_child(where, key), "required field is missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        names = schema.get("propertyNames")
        for key, item in value.items():
            path = _child(where, key)
            if names is not None:
                try:
                    validate(key, names, root, path)
                except SchemaViolation as exc:
                    raise SchemaViolation(path, f"unexpected key: {exc.problem}") from None
            if key in props:
                validate(item, props[key], root, path)
            elif extra is False:
                raise SchemaViolation(path, f"unknown field (allowed: {', '.join(props)})")
            elif isinstance(extra, dict):
                validate(item, extra, root, path)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], root, _child(where, i))


def _describe(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def validate_fingerprint(doc) -> None:
    """Schema plus the per-family parameter rule; raise SchemaViolation naming the bad field."""
    if isinstance(doc, dict) and doc.get("schema") not in (None, SCHEMA_ID):
        raise SchemaViolation("schema", f"this sparsec reads {SCHEMA_ID}, the file says {doc.get('schema')!r}")
    validate(doc, load_schema())
    for family, entries in doc["kernels"].items():
        need = FAMILY_PARAMS[family]
        for i, entry in enumerate(entries):
            where = _child(_child("kernels", family), i)
            for p in need:
                if p not in entry:
                    raise SchemaViolation(_child(where, p), f"required for {family} entries")
            for p in _ALL_PARAMS - set(need):
                if p in entry:
                    raise SchemaViolation(_child(where, p), f"not a parameter of {family}")
