"""qbhub's native block-delta engine: fixed chunks, keyed IDs, sealed packs, a hash-tree archive."""

FORMAT_VERSION = 1
