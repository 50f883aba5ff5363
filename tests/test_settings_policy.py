"""The settings policy (safety/policy.py) on Qubes 4.3's boot modes and the GUI's protections.

Each case is a feature or property a compromised restore worker could report; the test applies
dom0's policy to it and checks the verdict: never applied, applied only with the `--allow` word
that names its risk, or applied and listed as sensitive before anything is created.
"""

from __future__ import annotations

from typing import Any

import pytest

from qubes_backup_hub.errors import ValidationError
from qubes_backup_hub.safety import policy, vm_rules


def judge(
    features: dict[str, str] | None = None,
    properties: dict[str, Any] | None = None,
    allow: frozenset[str] = frozenset(),
) -> vm_rules.PolicyOutcome:
    ctx = vm_rules.PolicyContext(
        restored={"work": "AppVM"},
        existing={"fedora": vm_rules.KnownVM("TemplateVM")},
        untouchable={"backupvm"},
        allow=allow,
    )
    settings = {
        "properties": {"label": "red", "template": "fedora", **(properties or {})},
        "features": features or {},
    }
    return vm_rules.apply_policy([("work", "AppVM", settings)], ctx)


def applied_features(outcome: vm_rules.PolicyOutcome) -> dict[str, str]:
    return dict(outcome.settings["work"].get("features", {}))


@pytest.mark.parametrize(
    "feature",
    ["boot-mode.kernelopts.evil", "boot-mode.kernelopts.default"],
)
def test_boot_mode_kernel_options_need_their_flag(feature: str) -> None:
    """A boot mode's kernel options are the VM's kernel command line (init=/bin/sh...)."""
    outcome = judge({feature: "init=/bin/sh"})
    assert feature not in applied_features(outcome)
    assert any(feature in line for line in outcome.left_out)
    allowed = judge({feature: "init=/bin/sh"}, allow=frozenset({"kernel-options"}))
    assert applied_features(allowed)[feature] == "init=/bin/sh"
    assert any(feature in line for line in allowed.sensitive)


@pytest.mark.parametrize(
    "feature", ["boot-mode.active", "boot-mode.appvm-default", "boot-mode.default-user.x"]
)
def test_boot_mode_selection_is_listed(feature: str) -> None:
    outcome = judge({feature: "evil"})
    assert applied_features(outcome)[feature] == "evil"
    assert any(feature in line for line in outcome.sensitive)


def test_bootmode_property_is_listed() -> None:
    outcome = judge(properties={"bootmode": "evil"})
    assert any("bootmode" in line for line in outcome.sensitive)


@pytest.mark.parametrize(
    "feature",
    [
        "gui-override-redirect",
        "gui-override-redirect-protection",
        "gui-default-allow-fullscreen",
        "gui-secure-copy-sequence",
        "gui-something-new",
        "boot-mode.something-new",
    ],
)
def test_gui_protections_and_unknown_switches_are_never_restored(feature: str) -> None:
    outcome = judge({feature: ""})
    assert feature not in applied_features(outcome)
    allow_all = frozenset(policy.RISKS)
    assert feature not in applied_features(judge({feature: ""}, allow=allow_all))


@pytest.mark.parametrize("feature", ["gui-allow-fullscreen", "gui-allow-utf8-titles"])
def test_gui_spoofing_needs_its_flag(feature: str) -> None:
    assert feature not in applied_features(judge({feature: "1"}))
    allowed = judge({feature: "1"}, allow=frozenset({"gui-spoofing"}))
    assert applied_features(allowed)[feature] == "1"


@pytest.mark.parametrize(
    "feature", ["gui", "gui-emulated", "gui-trayicon-mode", "boot-mode.name.x"]
)
def test_harmless_gui_and_boot_mode_features_are_restored(feature: str) -> None:
    assert applied_features(judge({feature: "1"}))[feature] == "1"


@pytest.mark.parametrize("backend", ["disp1234", "newdisp", "nosuchvm"])
def test_devices_come_only_from_lasting_known_vms(backend: str) -> None:
    """A DispVM (the restore worker is one, running right now) or an unknown VM never serves a
    restored VM's devices."""
    ctx = vm_rules.PolicyContext(
        restored={"work": "AppVM", "newdisp": "DispVM"},
        existing={
            "fedora": vm_rules.KnownVM("TemplateVM"),
            "disp1234": vm_rules.KnownVM("DispVM"),
            "sys-usb": vm_rules.KnownVM("AppVM"),
        },
    )
    device = {"class": "block", "backend": backend, "ident": "xvdi", "options": {}}
    settings = {"properties": {"label": "red", "template": "fedora"}, "devices": [device]}
    with pytest.raises(ValidationError, match="may not serve devices"):
        vm_rules.apply_policy([("work", "AppVM", settings)], ctx)
    device["backend"] = "sys-usb"  # the control: an ordinary VM does
    outcome = vm_rules.apply_policy([("work", "AppVM", settings)], ctx)
    assert outcome.settings["work"]["devices"] == [device]
