"""sparsec: measure the hardware first, then rewrite each linear layer into the format it serves fastest.

The public names are imported on first use, so that ``import sparsec`` (and the command line,
which starts with it) does not load torch before it has to.
"""

import importlib

__version__ = "0.1.0"

import sparsec.logs  # noqa: E402,F401  (quiet 'sparsec' logger unless SPARSEC_LOG asks)

_PUBLIC = {
    "optimize": "sparsec.api",
    "Result": "sparsec.api",
    "Plan": "sparsec.plan",
    "Report": "sparsec.report",
    "load_fingerprint": "sparsec.fingerprint",
}

__all__ = ["optimize", "Result", "Plan", "Report", "load_fingerprint", "__version__"]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        try:  # a submodule not imported yet (sparsec.errors, sparsec.backend, ...)
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'sparsec' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
