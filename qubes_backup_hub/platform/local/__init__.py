"""LocalPlatform: Qubes stood in for on plain Linux (state file, volume files, sandboxed services).

`statefile` keeps VMs and their settings, `pools` the volume files, `sandbox` runs a service in
bubblewrap, `services` names the service modules, `platform` puts them together.
"""
