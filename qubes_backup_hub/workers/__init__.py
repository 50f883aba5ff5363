"""Workers: code that runs outside dom0's trust, in a DispVM (a bubblewrap sandbox locally), and
speaks to dom0 only through the restore channel (`qubes_backup_hub.safety.restore_channel`)."""
