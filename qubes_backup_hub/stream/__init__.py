"""Streams: reading a volume view as data extents. `base` is the interface; `file` the built-in."""
