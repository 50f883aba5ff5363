"""The real-dom0 platform: Admin API over the qubesd socket, qrexec to VMs (see `platform.py`)."""
