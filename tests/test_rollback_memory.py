"""The rollback memory (safety/rollback.py LocalState): never lowered, even by racing writers."""

from __future__ import annotations

import fcntl
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from qubes_backup_hub.errors import QbhubError
from qubes_backup_hub.safety.rollback import LocalState

ARCHIVE = "ab" * 16
KEY = "cd" * 16


def _remember_many(home: str, start: int, step: int, count: int) -> None:
    state = LocalState(Path(home))
    for generation in range(start, start + step * count, step):
        state.remember(ARCHIVE, KEY, generation)


def test_memory_only_rises(tmp_path: Path) -> None:
    state = LocalState(tmp_path)
    assert state.recall(ARCHIVE, KEY) is None
    state.remember(ARCHIVE, KEY, 7)
    state.remember(ARCHIVE, KEY, 3)
    memory = state.recall(ARCHIVE, KEY)
    assert memory is not None and memory.generation == 7
    assert set(state.recall_all(ARCHIVE)) == {KEY}


def test_remember_waits_for_another_writer(tmp_path: Path) -> None:
    """Read, compare and replace happen under one lock per archive and key, so two commands
    finishing at once cannot let the lower generation land last."""
    state = LocalState(tmp_path)
    state.remember(ARCHIVE, KEY, 1)
    lock_path = tmp_path / "archives" / f"{ARCHIVE}-{KEY}.lock"
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        writer = threading.Thread(target=state.remember, args=(ARCHIVE, KEY, 9))
        writer.start()
        time.sleep(0.5)
        memory = state.recall(ARCHIVE, KEY)
        assert memory is not None and memory.generation == 1, "wrote without the lock"
    writer.join(10)
    memory = state.recall(ARCHIVE, KEY)
    assert memory is not None and memory.generation == 9


def test_racing_writers_never_lower_it(tmp_path: Path) -> None:
    """Two processes remembering interleaved generations: the highest one is what stays."""
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_remember_many, args=(str(tmp_path), start, 2, 300)) for start in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    memory = LocalState(tmp_path).recall(ARCHIVE, KEY)
    assert memory is not None and memory.generation == 1 + 2 * 299


@pytest.mark.parametrize("generation", [-1, 2**62, "5", 1.0])
def test_refuses_impossible_generations(tmp_path: Path, generation: object) -> None:
    with pytest.raises(QbhubError):
        LocalState(tmp_path).remember(ARCHIVE, KEY, generation)  # type: ignore[arg-type]
