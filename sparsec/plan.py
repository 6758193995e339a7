"""Plans (``sparsec.plan/1``): which format each layer gets, as data users edit and replay.

``layers`` maps a layer name, a ``re:`` pattern (full match) or ``_default`` to a format name or
``auto``; a bare mapping of that kind (``{"_default": "2:4"}``) is taken as a plan's layers. Exact names win over patterns, patterns are tried in the order written, and
``_default`` applies last; a layer no entry names is ``auto``.

``experts`` maps expert banks (mixture of experts) the same way to the form their experts run in:
``dense``, ``2:4``, ``lowrank:F`` (F in (0, 1): that share of each projection's break-even rank,
docs/experts.md), ``block:B:D`` (each expert keeps the share D of its B x B blocks) or ``auto``; a
bank no entry names is ``auto``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from sparsec import interrupts
from sparsec.errors import PlanError
from sparsec.formats import FormatError, parse_spec

SCHEMA = "sparsec.plan/1"
PLAN_KEYS = {"schema", "fingerprint", "error_budget", "layers", "experts"}
BANK_FORM = re.compile(r"dense|auto|2:4|lowrank:(0?\.\d*[1-9]\d*)|block:(16|32|64|128):(0?\.\d*[1-9]\d*)")  # a bank's form (``experts``)


@dataclass
class Plan:
    layers: dict[str, str] = field(default_factory=dict)
    fingerprint: str | None = None
    error_budget: float | None = None
    experts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self._bank_patterns = []
        for key, value in self.experts.items():
            if not isinstance(key, str) or not isinstance(value, str) or not BANK_FORM.fullmatch(value):
                raise PlanError(f"plan entry experts {key!r}: {value!r} is not a form of expert bank; use dense, 2:4, "
                                "lowrank:F with F in (0, 1) (e.g. lowrank:0.25), block:B:D with B one of 16, 32, 64, "
                                "128 and D in (0, 1) (e.g. block:64:0.25), or auto")
            if key.startswith("re:"):
                try:
                    self._bank_patterns.append((key, re.compile(key[3:])))
                except re.error as exc:
                    raise PlanError(f"plan entry experts {key!r}: bad regular expression: {exc}") from None
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

    def resolve_bank(self, name: str) -> str:
        """The form asked for bank ``name`` (``auto`` where no ``experts`` entry names it)."""
        if name in self.experts:
            return self.experts[name]
        for key, pattern in self._bank_patterns:
            if pattern.fullmatch(name):
                return self.experts[key]
        return self.experts.get("_default", "auto")

    def unmatched(self, names, banks=()) -> list[str]:
        """The entries (names and ``re:`` patterns, not ``_default``) that match none of ``names``
        (layers) or, for ``experts`` entries, of ``banks``."""
        return (self._unmatched(self.layers, dict(self._patterns), list(names))
                + [f"experts {key}" for key in self._unmatched(self.experts, dict(self._bank_patterns), list(banks))])

    @staticmethod
    def _unmatched(entries: dict, patterns: dict, names: list[str]) -> list[str]:
        out = []
        for key in entries:
            if key == "_default":
                continue
            pattern = patterns.get(key)
            if pattern is not None:
                if not any(pattern.fullmatch(n) for n in names):
                    out.append(key)
            elif key not in names:
                out.append(key)
        return out

    def describe_unmatched(self, names, where: str = "the model", banks=()) -> str | None:
        """One message naming each entry that matches no layer (or bank) and the nearest names; None if all match."""
        import difflib

        layers, banks = list(names), list(banks)
        missing = self.unmatched(layers, banks)
        names = layers + banks
        if not missing:
            return None
        parts = []
        for key in missing:
            bare = key.removeprefix("experts ")
            near = difflib.get_close_matches(bare[3:] if bare.startswith("re:") else bare, names, n=3, cutoff=0.4)
            parts.append(f"{key!r}" + (f" (nearest: {', '.join(near)})" if near else ""))
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return (f"plan entr{'y' if len(missing) == 1 else 'ies'} {'; '.join(parts)} match{'es' if len(missing) == 1 else ''} "
                f"no layer of {where} (its layers: {shown or 'none'}); fix the name, or use a 're:' pattern or '_default'")

    def to_dict(self) -> dict:
        out = {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "error_budget": self.error_budget,
            "layers": dict(self.layers),
        }
        if self.experts:
            out["experts"] = dict(self.experts)
        return out

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
        experts = data.get("experts", {})
        if not isinstance(experts, dict):
            raise PlanError(f"{source}: 'experts' must be an object mapping expert banks to forms")
        try:
            return cls(layers=dict(layers), fingerprint=fp, error_budget=budget, experts=dict(experts))
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
        interrupts.check()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise PlanError(f"cannot write {path!r}: {exc.strerror}") from None
        raise
