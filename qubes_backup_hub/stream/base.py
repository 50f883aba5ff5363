"""The VolumeStream interface: a volume view's size, its data extents, and reads by offset."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator


class VolumeStream(ABC):
    """A readable volume view. Offsets and lengths are in bytes."""

    size: int

    @abstractmethod
    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of ranges in [start, end) that may hold data, in order.

        Ranges not yielded are holes: they read as zeros and are never read.
        """

    @abstractmethod
    def read_into(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill `buf` from `offset`; return the bytes read (short only at the end)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the underlying file."""

    def __enter__(self) -> VolumeStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
