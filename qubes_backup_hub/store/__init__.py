"""Stores: where archives live. `base` is the interface; `local` the built-in directory store."""
