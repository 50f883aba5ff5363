"""The qbhub command line: `main` is the group, one module per command family."""
