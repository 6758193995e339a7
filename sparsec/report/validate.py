"""Check a report dict against ``schema.json`` and say exactly which field is wrong.

sparsec may depend on nothing beyond torch, triton, onnx, onnxruntime, networkx, numpy and rich,
so this is a small validator for the part of JSON Schema the report schema uses: ``type`` (one
name or a list, ``null`` included), ``required``, ``properties``, ``items``, local ``$ref``,
``const``, ``enum``, ``minimum``, ``maximum``, ``minItems``, ``maxItems`` and ``minLength``.
Properties the schema does not list are accepted, so reports written by a newer sparsec that add
fields still load. Numbers must be finite: JSON has no NaN or infinity, and an unknown value is
written as ``null``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator

SCHEMA_ID = "sparsec.report/1"

_TYPE_CHECKS = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


@lru_cache(maxsize=1)
def report_schema() -> dict:
    """The JSON schema of ``sparsec.report/1`` shipped beside this module."""
    text = resources.files("sparsec.report").joinpath("schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def schema_errors(data: Any, schema: dict | None = None) -> list[str]:
    """Every violation of the schema, each as ``"<field path>: <what is wrong>"``; empty if valid."""
    root = report_schema() if schema is None else schema
    return list(_check(data, root, root, "$"))


def _check(value: Any, node: dict, root: dict, path: str) -> Iterator[str]:
    if "$ref" in node:
        node = _resolve(node["$ref"], root)
    if "const" in node and value != node["const"]:
        yield f"{path}: must be {node['const']!r}, got {_show(value)}"
        return
    if "enum" in node and value not in node["enum"]:
        allowed = ", ".join(repr(v) for v in node["enum"])
        yield f"{path}: must be one of {allowed}, got {_show(value)}"
        return
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_TYPE_CHECKS[t](value) for t in types):
            yield f"{path}: expected {' or '.join(types)}, got {_show(value)}"
            return
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{path}: {value} is not a finite number (write null when the value is unknown)"
        return
    yield from _check_bounds(value, node, path)
    if isinstance(value, dict):
        for key in node.get("required", ()):
            if key not in value:
                yield f"{path}: missing required field {key!r}"
        for key, sub in node.get("properties", {}).items():
            if key in value:
                yield from _check(value[key], sub, root, f"{path}.{key}")
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            yield from _check(item, node["items"], root, f"{path}[{i}]")


def _check_bounds(value: Any, node: dict, path: str) -> Iterator[str]:
    is_number = _TYPE_CHECKS["number"](value)
    if is_number and "minimum" in node and value < node["minimum"]:
        yield f"{path}: {value} is below the minimum {node['minimum']}"
    if is_number and "maximum" in node and value > node["maximum"]:
        yield f"{path}: {value} is above the maximum {node['maximum']}"
    if isinstance(value, list) and len(value) < node.get("minItems", 0):
        yield f"{path}: needs at least {node['minItems']} items, has {len(value)}"
    if isinstance(value, list) and "maxItems" in node and len(value) > node["maxItems"]:
        yield f"{path}: allows at most {node['maxItems']} items, has {len(value)}"
    if isinstance(value, str) and len(value) < node.get("minLength", 0):
        yield f"{path}: must not be empty"


def _resolve(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _show(value: Any) -> str:
    kind = "null" if value is None else type(value).__name__
    text = json.dumps(value, default=str) if not isinstance(value, (dict, list)) else kind
    if len(text) > 40:
        text = text[:37] + "..."
    return text if value is None or isinstance(value, (dict, list)) else f"{kind} {text}"
