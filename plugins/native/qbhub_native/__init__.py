"""qbhub's native block-delta engine: fixed chunks, keyed IDs, sealed packs, a hash-tree archive."""

FORMAT_VERSION = 2  # what new archives are written as; docs/FORMAT.md
