"""The command the container runs: the ``rwatch`` console script (Dockerfile ``ENTRYPOINT ["rwatch"]``).

Tests start rwatch through it, not through ``python -m rwatch``, so the entry point the image uses is the one
every process test exercises. It is the script installed beside the running interpreter (``pip install -e
'.[dev]'`` puts it there).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

RWATCH: Final = str(Path(sys.executable).with_name("rwatch"))
