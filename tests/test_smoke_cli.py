"""The CLI end to end: init, full and incremental backup, restore bit-exact, list, verify."""

from __future__ import annotations

from pathlib import Path

from conftest import Qbhub, rewrite_blocks


def test_full_then_incremental_restores_bit_exact(
    tmp_path: Path, qbhub: Qbhub, archive: Path, image_factory
) -> None:
    image = image_factory(blocks=96, tail=b"odd tail")
    first = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    rewrite_blocks(image, [3, 50])
    second = qbhub.json("volume", "backup", "--dest", archive, f"{image}=disk")
    assert second["volumes"][0]["chunks_new"] == 2
    assert second["bytes_stored"] < first["bytes_stored"] / 10
    out = tmp_path / "restored.img"
    qbhub.run("volume", "restore", "--dest", archive, "disk", "--to", out)
    assert out.read_bytes() == image.read_bytes()
    sessions = qbhub.json("list", "--dest", archive)["sessions"]
    assert [s["session"] for s in sessions] == [first["session"], second["session"]]
    assert qbhub.json("verify", "--dest", archive)["blobs_verified"] > 0
