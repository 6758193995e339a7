"""Output paths checked before any work, so a long run never ends on a file it cannot write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparsec.errors import SparsecError


def check_writable(output, error: type[SparsecError] = SparsecError, example: str = "out.json") -> Path:
    """``output`` as a Path, once its folder exists and a file can be created in it; else ``error``."""
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise error(f"cannot write {output}: folder {folder} does not exist")
    if output.is_dir():
        raise error(f"cannot write {output}: it is a folder; pass a file name such as {example}")
    try:  # a real probe: permission bits do not bind root, and read-only mounts ignore them
        fd, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise error(f"cannot write {output}: folder {folder} is not writable ({exc.strerror})") from None
    return output
