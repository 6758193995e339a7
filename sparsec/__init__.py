"""sparsec: measure the hardware first, then rewrite each linear layer into the format it serves fastest."""

__version__ = "0.1.0"

import sparsec.logs  # noqa: E402,F401  (quiet 'sparsec' logger unless SPARSEC_LOG asks)
from sparsec.api import Result, optimize  # noqa: E402
from sparsec.fingerprint import load_fingerprint  # noqa: E402
from sparsec.plan import Plan  # noqa: E402
from sparsec.report import Report  # noqa: E402

__all__ = ["optimize", "Result", "Plan", "Report", "load_fingerprint", "__version__"]
