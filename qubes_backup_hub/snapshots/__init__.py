"""Snapshot providers: consistent views of volumes and what changed since the last backup.

One module per provider (`reflink`, `thin`), shared helpers (`fiemap` for the kernel ioctls,
`ranges` for range arithmetic, `thindelta` for the thin_delta parser, `viewrecord` for the sidecar
of a kept view), and `plugin`, the hook implementation that picks a provider per volume.
"""
