"""Verity: a zero-trust service mesh."""

__version__ = "0.1.0"
