"""What a worker sends for a VM-level restore: the header of the strict restore stream.

Every engine's worker (the hub's restore worker, an external engine's own) builds the header the
same way from the session's settings document, then streams the volumes it lists, in order, as
DATA frames. This runs on the untrusted side: dom0 checks the header field by field
(`jobs.restore.parse_header`, the restore-validate hooks, the settings policy) and the lengths
exactly, whatever a worker sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import NotFoundError, QbhubError


@dataclass(frozen=True)
class VMStreamPlan:
    """The HEADER document to send, and the archive names of the volumes to stream after it."""

    header: dict[str, Any]
    archive_names: list[str]


def select_vms(metadata: dict[str, Any], wanted: list[str]) -> list[dict[str, Any]]:
    """The VM documents of the session, restricted to `wanted` (all when empty)."""
    vms = metadata.get("vms", [])
    if not isinstance(vms, list):
        raise QbhubError("the session's VM list is malformed")
    by_name = {vm.get("name"): vm for vm in vms if isinstance(vm, dict)}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise NotFoundError(f"no VM named {', '.join(missing)} in this session")
    return [by_name[name] for name in wanted] if wanted else list(by_name.values())


def plan_vm_stream(
    session: str, metadata: dict[str, Any], wanted: list[str], *, settings_only: bool
) -> VMStreamPlan:
    """The header for restoring `wanted` (all when empty) from a session with `metadata`."""
    vms = select_vms(metadata, wanted)
    try:
        header = {
            "session": session,
            "settings_only": settings_only,
            "vms": [
                {
                    "name": vm["name"],
                    "class": vm["class"],
                    "settings": vm["settings"],
                    "volumes": [{"name": v["name"], "size": v["size"]} for v in vm["volumes"]],
                }
                for vm in vms
            ],
        }
        names = [str(v["archive_name"]) for vm in vms for v in vm["volumes"]]
    except (KeyError, TypeError) as exc:
        raise QbhubError(f"the session's VM document is malformed ({exc})") from None
    return VMStreamPlan(header, [] if settings_only else names)
