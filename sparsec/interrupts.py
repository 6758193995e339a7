"""Ctrl-C that is never lost on its way to the command line's one-line exit.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be; when that is
a weakref callback or a finaliser (the import system's module-lock cleanup while torch loads, for
one), the exception is printed as "ignored" and the command runs on to write its outputs. The
command line's handler therefore also remembers the signal, and every step that puts a file in
place asks ``check()`` first, so an interrupt at any moment still ends in "nothing was written".
Outside the command line (a library user's own process) nothing is installed and ``check()`` never
raises.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_seen = False


def _on_sigint(signum, frame):
    global _seen
    _seen = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def installed():
    """Take SIGINT while the body runs (main thread only; elsewhere nothing changes), then give
    the previous handler back."""
    global _seen
    _seen = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived while ``installed`` (even if it was swallowed)."""
    if _seen:
        raise KeyboardInterrupt
