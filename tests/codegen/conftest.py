"""Kernel tests run the Triton kernels on the CPU interpreter, with small shapes so it stays fast."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    # sparsec.codegen decorates its kernels at first launch in the mode this variable names
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
