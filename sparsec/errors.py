"""Errors a user can act on.

Every failure caused by the user's input (a bad file, a bad option, an impossible plan) is a
``SparsecError`` whose message names the problem and what to do about it. The CLI prints that
message on one line and exits non-zero; it never shows a traceback for one of these.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" if it has none): what a one-line message quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class SparsecError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class OptionError(SparsecError):
    """An option passed to the backend, ``optimize`` or the CLI is invalid."""


class PlanError(SparsecError):
    """A plan file or dict is malformed or names layers/formats that cannot be applied."""


class FingerprintError(SparsecError):
    """A fingerprint cannot be found, read or validated."""


class ReportError(SparsecError):
    """A report file cannot be read or validated."""


class ModelError(SparsecError):
    """A model (ONNX file or torch module) cannot be read, traced or rewritten."""


class DataError(SparsecError):
    """Calibration or held-out data on which nothing can be fitted or measured."""
