"""Shared fixtures for the report tests: synthetic reports and a headless chromium."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests

from headless_browser import find_chromium  # noqa: E402
from report_factory import make_report  # noqa: E402


@pytest.fixture
def report_dict():
    """A two-block report with every field filled, timed, with held-out data."""
    return make_report(seed=3, blocks=2, tokens=2048, error_budget=0.03)


@pytest.fixture(scope="session")
def chromium():
    path, why_not = find_chromium()
    if path is None:
        pytest.skip(why_not)
    return path
