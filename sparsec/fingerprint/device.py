"""Who is this device: the description a fingerprint records and the slug that names its file.

The same code describes the device when a fingerprint is measured and when one is chosen or
checked ("auto", ``matches_current_device``), so the two always agree on names.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = [
    "current_device_kind",
    "current_device_name",
    "describe_device",
    "software_versions",
    "slugify",
    "device_slug",
    "user_fingerprint_dir",
    "free_memory_bytes",
]


def current_device_kind() -> str:
    """'cuda' when a CUDA device is usable, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def current_device_name(kind: str | None = None) -> str:
    """The device name as torch reports it (GPU) or the CPU model name."""
    kind = kind or current_device_kind()
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return _cpu_model_name()


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_memory_bytes() -> int | None:
    return _meminfo_bytes("MemTotal")


def _meminfo_bytes(field: str) -> int | None:
    """A field of Linux's /proc/meminfo in bytes; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on ``device`` now: a GPU's free memory, on the CPU what the system says is
    available; 0 where it cannot tell."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except RuntimeError:
            return 0
    if device.type == "cpu":
        return _meminfo_bytes("MemAvailable") or 0
    return 0


def _cpu_l2_bytes() -> int | None:
    """Per-core L2 size from sysfs (index2 is the unified L2 on x86 and arm64 Linux)."""
    p = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
    try:
        text = p.read_text().strip().upper()
    except OSError:
        return None
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    if not m:
        return None
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
    return int(m.group(1)) * scale


def describe_device(kind: str | None = None) -> dict:
    """The ``device`` block of a fingerprint for the device this process runs on."""
    kind = kind or current_device_kind()
    if kind == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return {
            "kind": "cuda",
            "name": props.name,
            "capability": [int(props.major), int(props.minor)],
            "sms": int(props.multi_processor_count),
            "l2_bytes": int(getattr(props, "L2_cache_size", 0)) or None,
            "memory_bytes": int(props.total_memory),
            "cores": None,
        }
    return {
        "kind": "cpu",
        "name": _cpu_model_name(),
        "capability": None,
        "sms": None,
        "l2_bytes": _cpu_l2_bytes(),
        "memory_bytes": _cpu_memory_bytes(),
        "cores": _cpu_cores(),
    }


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()
    return first[0].strip() if out.returncode == 0 and first else None


def software_versions(kind: str | None = None) -> dict:
    """The ``software`` block: versions that change what a kernel costs."""
    kind = kind or current_device_kind()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "driver": _nvidia_driver() if kind == "cuda" else None,
    }


def slugify(text: str) -> str:
    """Lower-case, runs of anything but letters and digits become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(kind: str | None = None) -> str:
    """File stem of the user's own fingerprint for this device, e.g. 'nvidia-h200' or 'cpu-amd-epyc'."""
    kind = kind or current_device_kind()
    name = slugify(current_device_name(kind))
    return name if kind == "cuda" else f"cpu-{name}"


def user_fingerprint_dir() -> Path:
    """Where fingerprints a user measured live: $SPARSEC_HOME/fingerprints or ~/.cache/sparsec/fingerprints."""
    home = os.environ.get("SPARSEC_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "sparsec"
    return base / "fingerprints"
