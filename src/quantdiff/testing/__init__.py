"""Tiny real pipelines and their configs, built offline: for tests, demos and the tiny bench cases."""
