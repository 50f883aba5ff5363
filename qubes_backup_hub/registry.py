"""The plugin manager: loads plugins from the entry-point group and collects their offers."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from . import PLUGIN_GROUP, hookspecs
from .engine import EngineType
from .errors import NotFoundError, UsageError
from .store.base import Store, StoreType


@dataclass
class Registry:
    """What the installed plugins offer: engines and stores by name, and the hook caller."""

    pm: pluggy.PluginManager
    engines: dict[str, EngineType] = field(default_factory=dict)
    stores: dict[str, StoreType] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def engine(self, name: str) -> EngineType:
        """Return the engine registered as `name`, or raise NotFoundError listing the known ones."""
        try:
            return self.engines[name]
        except KeyError:
            known = ", ".join(sorted(self.engines)) or "none"
            raise NotFoundError(
                f"no engine named {name!r} is installed (installed: {known})"
            ) from None

    def engine_for_root(self, root: bytes | None) -> str:
        """The engine that wrote `root` (by `EngineType.claims_root`); "native" otherwise."""
        if root is not None:
            for engine in self.engines.values():
                if engine.claims_root is not None and engine.claims_root(root):
                    return engine.name
        return "native"

    def open_store(self, url: str) -> Store:
        """Open the store at `url`: `scheme://...` picks a store type; a plain path means `file`."""
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        store_type = self.stores.get(scheme)
        if store_type is None:
            known = ", ".join(sorted(self.stores)) or "none"
            raise UsageError(f"no store handles {scheme!r} URLs (installed schemes: {known})")
        return store_type.open(url)


def _collect(pm: pluggy.PluginManager) -> Registry:
    registry = Registry(pm=pm)

    def register_engine(engine: EngineType) -> None:
        if engine.name in registry.engines:
            registry.problems.append(f"duplicate engine {engine.name!r} ignored")
            return
        registry.engines[engine.name] = engine

    def register_store(store_type: StoreType) -> None:
        if store_type.scheme in registry.stores:
            registry.problems.append(f"duplicate store scheme {store_type.scheme!r} ignored")
            return
        registry.stores[store_type.scheme] = store_type

    # Call registration hooks in registration order (built-ins and earlier plugins first), so a
    # later plugin can never take over a name that is already registered.
    for impl in pm.hook.qbhub_register_engines.get_hookimpls():
        impl.function(register=register_engine)
    for impl in pm.hook.qbhub_register_stores.get_hookimpls():
        impl.function(register=register_store)
    return registry


def _load_order(ep: EntryPoint) -> tuple[int, str]:
    """The host's own plugins first, then the project's engines, then everything else."""
    dist = ep.dist.name if ep.dist is not None else ""
    return ({"qbhub": 0, "qbhub-native": 1}.get(dist, 2), ep.name)


def load_registry(extra_plugins: tuple[object, ...] = ()) -> Registry:
    """Build a plugin manager from the entry-point group (plus `extra_plugins`) and collect offers.

    A third-party plugin that fails to import is reported on stderr and skipped; the rest load.
    """
    pm = pluggy.PluginManager(PLUGIN_GROUP)
    pm.add_hookspecs(hookspecs)
    problems: list[str] = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=_load_order):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not break the host
            problems.append(f"plugin {ep.name!r} failed to load: {exc}")
            continue
        pm.register(plugin, name=ep.name)
    for plugin in extra_plugins:
        pm.register(plugin)
    pm.check_pending()
    registry = _collect(pm)
    registry.problems[:0] = problems
    for problem in registry.problems:
        print(f"qbhub: warning: {problem}", file=sys.stderr)
    return registry
