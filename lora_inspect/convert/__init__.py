"""Adapter algebra: a canonical in-memory form, writers for every layout, ``convert`` and ``merge``."""
