"""Services that run in other VMs: the storage agent (backup VM) and the restore worker (DispVM)."""
