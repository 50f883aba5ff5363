"""qbhub's Borg engine (`plugins/borg_qrexec`): Borg behind qbhub's worker model.

dom0 never runs borg and never reads the Borg repository. Every borg command runs in a backup
worker (a bubblewrap sandbox here, a DispVM on Qubes) that sees the volumes read-only and reaches
the repository only through `borg serve --restrict-to-repository` started beside the storage
(`BORG_RSH` is the transport). Restores come back as qbhub's strict restore stream.
"""
