"""sparsec: measure the hardware first, then rewrite each linear layer into the format it serves fastest."""

__version__ = "0.1.0"
