"""Import sparsec from this checkout when it is not installed (e.g. on a bare device machine).

The package directories are mapped as pyproject.toml maps them (passes/ -> sparsec.passes, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path


def ensure_sparsec_importable() -> None:
    """Map sparsec's package directories as pyproject.toml does when sparsec is not installed."""
    try:
        import sparsec.codegen  # noqa: F401
        import sparsec.fingerprints  # noqa: F401
        return
    except ImportError:
        pass
    import importlib.util
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    try:
        import tomllib

        mapping = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    except ImportError:  # Python 3.10: read the one-line table
        table = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M).group(1)
        mapping = dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', table))

    class RepoPackages:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in mapping:
                return None
            d = root / mapping[name]
            return importlib.util.spec_from_file_location(name, d / "__init__.py", submodule_search_locations=[str(d)])

    for name in [m for m in sys.modules if m == "sparsec" or m.startswith("sparsec.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, RepoPackages)


