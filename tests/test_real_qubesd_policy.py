"""dist/qubes/policy.d/30-qbhub.policy under the REAL qrexec policy parsers of Qubes 4.2 and 4.3.

The parser is qubes-core-qrexec's own (`qrexec.policy.parser`, from ../shared/qubes-reference,
installed in the venvs tests/real_qubesd.py builds); the system it evaluates against is a fixed
description (dom0, a backup VM tagged qbhub-storage, an AppVM, the default DispVM template and a
DispVM), as qrexec's own tests use. The policy must allow exactly the calls qbhub makes (dom0 ->
tagged backup VM: qbhub.Storage+ARCHIVE; dom0 -> a DispVM: qbhub.RestoreWorker without
argument) and deny everything else. Qubes 4.2 does not evaluate policy for calls dom0 makes
(its parser's AdminVM is "no Source": a rule's dom0/@adminvm source never equals "dom0"), so
there only the VM-originated calls are checked, and that dom0's calls are indeed not matched by
the allow lines is asserted, so a change of that behaviour shows up here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import real_qubesd

POLICY = Path(__file__).parents[1] / "dist" / "qubes" / "policy.d" / "30-qbhub.policy"
EVALUATE = r"""
import json, sys
from qrexec.policy import parser
from qrexec.exc import AccessDenied
policy = parser.StringPolicy(policy={"__main__": open(sys.argv[1]).read()})
def dom(kind, tags=(), dvm_template=False):
    return {"tags": list(tags), "type": kind, "default_dispvm": "default-dvm", "icon": "",
            "template_for_dispvms": dvm_template, "power_state": "Running", "guivm": None,
            "relayvm": None, "uuid": None}
info = {"domains": {"dom0": dom("AdminVM"), "sys-backup": dom("AppVM", ["qbhub-storage"]),
                    "work": dom("AppVM"), "default-dvm": dom("AppVM", dvm_template=True),
                    "disp1234": dom("DispVM")}}
out = {}
for line in json.load(sys.stdin):
    service, arg, source, target = line.split(" ")
    try:
        res = policy.evaluate(parser.Request(service, arg, source, target, system_info=info))
        out[line] = "allow"
    except AccessDenied as e:
        out[line] = "deny " + str(e)
print(json.dumps(out))
"""

# What qbhub does: QrexecStore -> call_service(BACKUPVM, "qbhub.Storage", [ARCHIVE]);
# restore -> dispvm_service("qbhub.RestoreWorker") in the DispVM it created.
QBHUB_CALLS = [
    "qbhub.Storage +main dom0 sys-backup",
    "qbhub.Storage +other-archive dom0 sys-backup",
    "qbhub.RestoreWorker + dom0 disp1234",
    "qbhub.RestoreWorker + dom0 @dispvm",
]
OTHER_DOM0_CALLS = [
    "qbhub.Storage +main dom0 work",
    "qbhub.Storage +main dom0 disp1234",
    "qbhub.RestoreWorker + dom0 work",
    "qbhub.RestoreWorker +x dom0 disp1234",
    "qbhub.RestoreWorker + dom0 sys-backup",
]
VM_CALLS = [
    f"{service} {arg} {source} {target}"
    for service, arg in (("qbhub.Storage", "+main"), ("qbhub.RestoreWorker", "+"))
    for source in ("work", "sys-backup", "disp1234", "default-dvm")
    for target in ("sys-backup", "work", "disp1234", "@dispvm", "dom0", "@adminvm")
]


def evaluate(version: str, calls: list[str]) -> dict[str, str]:
    why = real_qubesd.missing(version)
    if why:
        pytest.skip(f"real qrexec policy parser {version} unavailable: {why}")
    proc = subprocess.run(
        [str(real_qubesd.venv_python(version)), "-c", EVALUATE, str(POLICY)],
        input=json.dumps(calls),
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, str] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("version", real_qubesd.VERSIONS)
def test_policy_denies_every_call_from_a_vm(version: str) -> None:
    verdicts = evaluate(version, VM_CALLS)
    assert {c: v for c, v in verdicts.items() if not v.startswith("deny")} == {}


def test_policy_allows_exactly_qbhubs_calls_on_43() -> None:
    verdicts = evaluate("4.3", QBHUB_CALLS + OTHER_DOM0_CALLS)
    assert {c for c, v in verdicts.items() if v == "allow"} == set(QBHUB_CALLS)


def test_policy_parses_on_42_where_dom0_calls_are_not_evaluated() -> None:
    verdicts = evaluate("4.2", QBHUB_CALLS + OTHER_DOM0_CALLS)
    # 4.2 evaluates no policy for dom0's own calls; its parser matches no @adminvm source
    assert all(v.startswith("deny") for v in verdicts.values())
