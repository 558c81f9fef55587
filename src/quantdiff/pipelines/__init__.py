"""Diffusers pipelines: loading local folders, architecture knowledge, tiny test pipelines."""
