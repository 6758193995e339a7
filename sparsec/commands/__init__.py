"""The ``sparsec`` subcommands, one module each, and what they share."""


def console(width: int | None = None):
    """A rich console as wide as asked, as the terminal, or (piped, no COLUMNS) wide enough to read."""
    import os
    import sys

    from rich.console import Console

    if width is None and not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        width = 160
    return Console(width=width)
