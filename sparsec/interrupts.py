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

import signal
import threading

_seen = False


def _on_sigint(signum, frame):
    global _seen
    _seen = True
    raise KeyboardInterrupt


def install() -> None:
    """Take SIGINT for the rest of the process (main thread only; elsewhere a no-op)."""
    global _seen
    _seen = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise ``KeyboardInterrupt`` if SIGINT arrived since ``install`` (even if it was swallowed)."""
    if _seen:
        raise KeyboardInterrupt
