"""``python -m rwatch``: the same command line as the ``rwatch`` script."""

from rwatch.cli import main

main()
