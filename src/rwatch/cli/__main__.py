"""``python -m rwatch.cli``: the ``rwatch`` command."""

from rwatch.cli import main

main()
