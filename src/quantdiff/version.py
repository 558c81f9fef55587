"""The quantdiff version, stored in every file quantdiff writes."""

__version__ = "0.1.0"
