"""Platforms: what the hub needs from Qubes (or from plain Linux standing in for it)."""
