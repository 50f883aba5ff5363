"""The dom0-safety layer: everything dom0 trusts, and the checks that earn that trust.

Storage, the storage VM and every worker are hostile. What comes back from them reaches dom0 only
through this package:

- `names`: object, volume and session names that cross a trust boundary.
- `restore_channel`: the framed channel to a restore worker, every frame size-capped.
- `restore_header`: the typed header of a restore stream (what will be created and imported).
- `policy`: the VM-settings policy as data: per property, feature, tag and device class.
- `vm_rules`: the checks of VM names and settings that apply the policy.
- `validate`: the built-in restore-validate hook, run on every restore header.
- `rollback`: this machine's memory of each archive (generation, key fingerprint).
- `jsonlimits`: JSON from untrusted sources, UTF-8 only, size and nesting bounded first.
- `text`: untrusted text made safe to show on the user's terminal.
"""
