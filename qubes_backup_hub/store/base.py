"""The store interface: a flat namespace of immutable objects plus one small mutable root.

Stores are untrusted transports. They never interpret what they hold; engines authenticate every
byte they read back. Every name crossing this interface matches `names.OBJECT_NAME`, and every
read states the most it will accept, so a hostile store can't make the reader allocate without
bound.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

Bytes = bytes | bytearray | memoryview


def waiting_message(where: str, wait: float) -> str:
    """What a command says when it starts waiting for another one's lock."""
    return f"{where} is locked by another qbhub command; waiting up to {wait:g} s (--lock-wait)"


class Store(ABC):
    """One archive location."""

    url: str
    # Seconds `lock()` keeps retrying a lock another command holds, when called without `wait`.
    # The CLI sets it from --lock-wait; 0.0 (the default) fails at once, as stores always did.
    lock_wait: float = 0.0
    # Told once, with a sentence, when lock() finds the lock held and starts waiting for it
    # (the CLI prints it, so a waiting command does not look hung).
    on_lock_wait: Callable[[str], None] | None = None

    @abstractmethod
    def exists(self) -> bool:
        """True if the location holds an archive (a root object)."""

    @abstractmethod
    def create(self) -> None:
        """Prepare an empty location for a new archive; refuse if it already holds one."""

    @abstractmethod
    def put(self, name: str, data: Bytes) -> None:
        """Store object `name` durably. Objects are immutable: `name` must not exist yet."""

    @abstractmethod
    def get(self, name: str, max_size: int) -> bytes:
        """Return object `name`; raise StoreError if it is missing or larger than `max_size`."""

    @abstractmethod
    def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Return exactly `length` bytes of object `name` from `offset` (StoreError if short)."""

    @abstractmethod
    def list(self) -> Iterator[tuple[str, int]]:
        """Yield (name, size) of every object (not the root).

        Stream it: archives hold millions of objects, so don't build the whole listing first.
        Anything in the location that is not an object (stray files, debris) is skipped.
        """

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove object `name`; a missing object is not an error."""

    @abstractmethod
    def get_root(self, max_size: int) -> bytes | None:
        """Return the root object, None if there is none, StoreError if above `max_size`."""

    @abstractmethod
    def put_root(self, data: bytes) -> None:
        """Replace the root atomically: a reader sees the old root or the new, never a mix."""

    @abstractmethod
    def lock(self) -> AbstractContextManager[None]:
        """Hold the archive for one writer; raise StoreError if another holds it.

        If another writer holds it, keep retrying for `self.lock_wait` seconds (0: give up at
        once), then raise StoreError saying the archive is locked by another qbhub command and
        how long this one waited. The built-in stores also take `lock(*, wait=SECONDS)`, which
        overrides `lock_wait` for one call; it is not part of this abstract signature so that
        stores written before it keep type-checking (they simply never wait).
        """

    def remove_partial_uploads(self) -> int:
        """Delete debris of interrupted writes (never visible objects); return how many.

        Only call while holding `lock()`. The default store has none to remove.
        """
        return 0

    def close(self) -> None:  # noqa: B027 - optional: most stores hold nothing open
        """Release connections; the store is not used afterwards."""


@dataclass(frozen=True)
class StoreType:
    """A store implementation as registered by a plugin, named by the URL scheme it handles."""

    scheme: str
    description: str
    open: Callable[[str], Store]
