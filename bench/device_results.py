"""What every device bench records beside its rows: the card, the versions, the date and how it
timed; the one JSON file it writes them to under ``--out``; and the line its summary starts with."""

from __future__ import annotations

import datetime
import json
import os

import torch


def device_meta(mode: str) -> dict:
    """The card and software a run measured on, today's date and the timing ``mode`` in words."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "date": datetime.date.today().isoformat(), "mode": mode}


def heading(meta: dict) -> str:
    """The line a summary table starts with: card, versions and date."""
    return f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}"


def write_rows(out_dir: str, name: str, meta: dict, rows: list[dict]) -> str:
    """``{"meta", "rows"}`` as ``out_dir/name`` (written whole, then moved into place); its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path
