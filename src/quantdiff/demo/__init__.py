"""Demonstrations built on quantdiff, kept apart from the library: ``digits`` (the bundled digits models)."""
