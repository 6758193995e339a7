"""Plans (``sparsec.plan/1``): which format each layer gets, as data users edit and replay.

``layers`` maps a layer name, a ``re:`` pattern (full match) or ``_default`` to a format name or
``auto``; a bare mapping of that kind (``{"_default": "2:4"}``) is taken as a plan's layers. Exact names win over patterns, patterns are tried in the order written, and
``_default`` applies last; a layer no entry names is ``auto``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from sparsec.errors import PlanError
from sparsec.formats import FormatError, parse_spec

SCHEMA = "sparsec.plan/1"
PLAN_KEYS = {"schema", "fingerprint", "error_budget", "layers"}


@dataclass
class Plan:
    layers: dict[str, str] = field(default_factory=dict)
    fingerprint: str | None = None
    error_budget: float | None = None

    def __post_init__(self):
        self._patterns = []
        for key, value in self.layers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise PlanError(f"plan entry {key!r}: {value!r} must map a layer name to a format name")
            if value != "auto":
                try:
                    parse_spec(value)
                except FormatError as exc:
                    raise PlanError(f"plan entry {key!r}: {exc}") from None
            if key.startswith("re:"):
                try:
                    self._patterns.append((key, re.compile(key[3:])))
                except re.error as exc:
                    raise PlanError(f"plan entry {key!r}: bad regular expression: {exc}") from None

    def resolve(self, name: str) -> tuple[str, str | None]:
        """The format asked for ``name`` and the plan key that asked for it (None: nothing did)."""
        if name in self.layers:
            return self.layers[name], name
        for key, pattern in self._patterns:
            if pattern.fullmatch(name):
                return self.layers[key], key
        if "_default" in self.layers:
            return self.layers["_default"], "_default"
        return "auto", None

    def unmatched(self, names) -> list[str]:
        """The entries (names and ``re:`` patterns, not ``_default``) that match none of ``names``."""
        names = list(names)
        out = []
        for key in self.layers:
            if key == "_default":
                continue
            pattern = dict(self._patterns).get(key)
            if pattern is not None:
                if not any(pattern.fullmatch(n) for n in names):
                    out.append(key)
            elif key not in names:
                out.append(key)
        return out

    def describe_unmatched(self, names, where: str = "the model") -> str | None:
        """One message naming each entry that matches no layer and the nearest layer names; None if all match."""
        import difflib

        names = list(names)
        missing = self.unmatched(names)
        if not missing:
            return None
        parts = []
        for key in missing:
            near = difflib.get_close_matches(key[3:] if key.startswith("re:") else key, names, n=3, cutoff=0.4)
            parts.append(f"{key!r}" + (f" (nearest: {', '.join(near)})" if near else ""))
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return (f"plan entr{'y' if len(missing) == 1 else 'ies'} {'; '.join(parts)} match{'es' if len(missing) == 1 else ''} "
                f"no layer of {where} (its layers: {shown or 'none'}); fix the name, or use a 're:' pattern or '_default'")

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "error_budget": self.error_budget,
            "layers": dict(self.layers),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path) -> None:
        _atomic_write(os.fspath(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan is a JSON object with 'schema' and 'layers'")
        if data and not set(data) & PLAN_KEYS:  # a bare mapping of layers, the first thing a user types
            data = {"layers": data}
        schema = data.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise PlanError(f"{source}: schema {schema!r} is not {SCHEMA!r}")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object mapping layer names to formats")
        budget = data.get("error_budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
            raise PlanError(f"{source}: 'error_budget' must be a number or null")
        fp = data.get("fingerprint")
        if fp is not None and not isinstance(fp, str):
            raise PlanError(f"{source}: 'fingerprint' must be a string or null")
        try:
            return cls(layers=dict(layers), fingerprint=fp, error_budget=budget)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path) -> "Plan":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise PlanError(f"plan file {path!r} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"plan file {path!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def coerce(cls, value) -> "Plan":
        """A Plan from a Plan, a dict or a path."""
        if isinstance(value, Plan):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        return cls.load(value)


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise PlanError(f"cannot write {path!r}: directory {directory!r} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise PlanError(f"cannot write {path!r}: {exc.strerror}") from None
