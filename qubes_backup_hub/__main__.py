"""`python -m qubes_backup_hub` runs the CLI."""

import sys

from .cli.main import main

sys.exit(main())
