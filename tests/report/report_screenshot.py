"""Write the sample HTML report and its screenshot for docs/report.md.

    python tests/report/report_screenshot.py [docs/report-screenshot.png]

The report is synthetic (``report_factory``): two Llama-3-8B-shaped blocks at M=2048 with a 3%
budget, planned on a fingerprint from another GPU so that the mismatch warning shows.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from headless_browser import find_chromium, screenshot  # noqa: E402
from report_factory import make_report  # noqa: E402

from sparsec.report import Report  # noqa: E402


def main(out: str = "docs/report-screenshot.png") -> int:
    chromium, why_not = find_chromium()
    if chromium is None:
        print(why_not, file=sys.stderr)
        return 1
    data = make_report(seed=3, blocks=2, tokens=2048, error_budget=0.03,
                       fingerprint_device="NVIDIA H100 80GB HBM3", device="NVIDIA H200")
    data["skipped"] = [{"name": "model.embed_tokens", "op": "embedding", "reason": "not a linear layer"}]
    with tempfile.TemporaryDirectory() as folder:
        page = Report(data).save(Path(folder) / "report.html")
        screenshot(chromium, page, Path(out), size=(1400, 1000))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
