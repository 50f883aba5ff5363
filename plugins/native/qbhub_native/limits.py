"""Size caps applied before reading anything from a store (storage is hostile)."""

MAX_ROOT = 16 * 1024 * 1024
MAX_INDEX_OBJECT = 256 * 1024 * 1024
MAX_PACK = 64 * 1024 * 1024
MAX_TRAILER = 8 * 1024 * 1024
MAX_SESSION_RECORD = 64 * 1024 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
MAX_VOLUME_SIZE = 1 << 50  # 1 PiB
MAX_TREE_HEIGHT = 8
