"""`qbhub engines`: what the installed plugins offer."""

from __future__ import annotations

from typing import Any

import click

from ..engine import CAPABILITIES
from .context import cli_state


@click.command()
@click.option("--json", "json_output", is_flag=True, help="Print machine-readable JSON.")
def engines(json_output: bool) -> None:
    """List installed engines and stores, with what each can do."""
    state = cli_state(json_output)
    registry = state.registry
    result: dict[str, Any] = {
        "engines": [
            {"name": e.name, "description": e.description, "capabilities": sorted(e.capabilities)}
            for e in registry.engines.values()
        ],
        "stores": [
            {"scheme": s.scheme, "description": s.description} for s in registry.stores.values()
        ],
        "problems": registry.problems,
    }

    def human(r: dict[str, Any]) -> str:
        lines = ["Engines:"]
        for e in r["engines"]:
            lines.append(f"  {e['name']}: {e['description']}")
            for cap in e["capabilities"]:
                lines.append(f"    - {cap}: {CAPABILITIES.get(cap, '')}")
        lines.append("Stores:")
        lines += [f"  {s['scheme']}: {s['description']}" for s in r["stores"]]
        return "\n".join(lines)

    state.emit(result, human)
