"""LVM thin volumes as Qubes' ThinVolume driver names them (qubes-core-admin qubes/storage/lvm.py).

A volume's vid is ``VG/vm-NAME-VOLUME`` (the committed state); next to it Qubes keeps:

- ``vm-NAME-VOLUME-snap``: while the VM runs, the volume it writes (a thin snapshot of the
  committed one made at start, or of the template's for snap_on_start volumes);
- ``vm-NAME-VOLUME-import``: an import (ImportWithSize, CloneTo) in progress;
- ``vm-NAME-VOLUME-TIMESTAMP-back``: revisions. At VM stop the committed volume is renamed to
  ``-{int(time.time())}-back`` and ``-snap`` renamed to the committed name; a revert removes the
  committed volume and makes it again as a thin snapshot of a revision (``clone``).

qbhub's own snapshots sit beside them and end in ``-snap`` too, so that Qubes' pool listing
(which skips ``-snap``, ``-import`` and ``-back``) never shows them as volumes and Qubes' revision
parsing never sees them: ``LV-qbk<archive tag>-snap`` is the view kept for the next incremental,
``LV-qbn<random>-snap`` the one a backup is reading. Kept views are inactive, read-only and
skipped at activation (``lvchange -K`` brings one up to look at it).

A kept view is known by its thin ID *and* its LVM UUID (`view_identity`): LVM gives a new thin
volume the lowest free thin ID, so an LV removed and made again under the same name (measured in
the test VM) often has the very same thin ID, and only the UUID tells it is another volume.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_REVISION = re.compile(r"(.+)-(\d+)-back")
_QBHUB = re.compile(r"(.+)-qb[kn][0-9a-f]{1,32}-snap")
LVS_FIELDS = (
    "lv_name,thin_id,lv_size,pool_lv,origin,lv_time,lv_attr,data_percent,metadata_percent,lv_uuid"
)


@dataclass(frozen=True)
class LvInfo:
    """One row of ``lvs``: what the provider needs to know about a logical volume."""

    name: str
    thin_id: int | None  # None: not a thin volume
    size: int  # bytes
    pool: str  # the thin pool of a thin volume, "" otherwise
    origin: str  # the LV a snapshot was taken of, "" if none (or removed since)
    time: int  # creation time, seconds since the epoch (kept across renames)
    attr: str
    data_percent: float | None = None  # thin pools (and thin volumes): data space used
    metadata_percent: float | None = None  # thin pools: metadata space used
    uuid: str = ""  # LVM's UUID of the LV: new for every LV made, kept across renames

    @property
    def is_thin_volume(self) -> bool:
        return self.attr[:1] == "V" and self.thin_id is not None and bool(self.pool)

    @property
    def active(self) -> bool:
        return self.attr[4:5] == "a"


def lvs_argv(target: str) -> list[str]:
    """``lvs`` for every LV of a VG (or one VG/LV), with times in seconds since the epoch."""
    return ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
            "--config", 'report/time_format="%s"', "--options", LVS_FIELDS, target]  # fmt: skip


def parse_lvs(out: str) -> dict[str, LvInfo]:
    """Rows of `lvs_argv` output by LV name; malformed rows raise ValueError."""
    table: dict[str, LvInfo] = {}
    for line in out.splitlines():
        if not line.strip():
            continue
        f = [x.strip() for x in line.split("|")]
        if len(f) != 10 or not f[0] or not f[2].isdigit():
            raise ValueError(f"unexpected lvs row {line.strip()[:120]!r}")
        table[f[0]] = LvInfo(
            name=f[0],
            thin_id=int(f[1]) if f[1].isdigit() else None,
            size=int(f[2]),
            pool=f[3],
            origin=f[4],
            time=int(f[5]) if f[5].isdigit() else 0,
            attr=f[6],
            data_percent=float(f[7]) if f[7] else None,
            metadata_percent=float(f[8]) if f[8] else None,
            uuid=f[9],
        )
    return table


def view_identity(info: LvInfo) -> int:
    """What pins a kept view (`viewrecord.ViewRecord.identity`): its thin ID (24 bits in
    device-mapper) and 64 bits of a hash of its UUID above them."""
    digest = hashlib.sha256(info.uuid.encode()).digest()[:8]
    return int.from_bytes(digest, "big") << 24 | (info.thin_id or 0) & 0xFFFFFF


def kept_name(lv: str, tag: str) -> str:
    return f"{lv}-qbk{tag}-snap"


def new_name(lv: str, token: str) -> str:
    return f"{lv}-qbn{token}-snap"


def is_qbhub_view(lv: str) -> bool:
    return _QBHUB.fullmatch(lv) is not None


def qubes_base(lv: str) -> str:
    """The committed volume's name for any of Qubes' names around it (or qbhub's views)."""
    m = _QBHUB.fullmatch(lv)
    if m:
        lv = m.group(1)
    m = _REVISION.fullmatch(lv)
    if m:
        return m.group(1)
    for suffix in ("-snap", "-import"):
        if lv.endswith(suffix):
            return lv[: -len(suffix)]
    return lv


def revision_time(lv: str, base: str) -> int | None:
    """The TIMESTAMP of ``BASE-TIMESTAMP-back``, or None if `lv` is not a revision of `base`."""
    m = _REVISION.fullmatch(lv)
    return int(m.group(2)) if m and m.group(1) == base else None


def history_since(table: dict[str, LvInfo], lv: str, since: int) -> str:
    """Why `lv`'s data may have been replaced since time `since`, by Qubes' conventions; or "".

    Walks the origins of `lv` while they were created at or after `since` (the kept view's
    creation): a VM stop leaves the committed volume as the renamed ``-snap``, whose origin is
    the revision made at that stop, ``-T-back`` with T >= its own creation. A volume made as a
    snapshot of a revision that already existed (T <= its creation) was reverted
    (``qvm-volume revert``); one made from any other LV was replaced by a clone of it
    (``qvm-volume import``, CloneTo). Origins that no longer exist end the walk: thin_delta is
    exact either way (it compares block mappings, not history); this is what lets the provider
    say *why* it scans everything, and scan rather than trust a volume whose history was
    rewritten.
    """
    base = qubes_base(lv)
    seen: set[str] = set()
    info = table.get(lv)
    while info is not None and info.time >= since and info.name not in seen:
        seen.add(info.name)
        origin = info.origin
        if not origin:
            return ""
        t = revision_time(origin, base)
        if t is not None:
            if t <= info.time:
                return f"{info.name} was reverted to revision {origin} (Qubes revert)"
        elif origin not in (base, f"{base}-snap"):
            return f"{info.name} was replaced by a clone of {origin}"
        info = table.get(origin)
    return ""
