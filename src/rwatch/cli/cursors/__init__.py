"""``rwatch cursors list|reset``: see and move the saved positions in the cursor store.

``rwatch cursors list [--config] [--json]``
    One row per resource of the tenant (``cmdb.tenant``): every enabled resource, plus any resource with a
    saved position, an open gap or a lease row. Columns:

    * **mode**: where the next watcher term starts: ``cursor`` (a CMDB cursor is saved), ``start_from`` (a reset
      left a start time), ``now`` (a reset to now: CMDB's newest event on), ``none`` (nothing saved: the watcher
      starts from now, recording the bootstrap gap [0, now) first when ``watch.bootstrap = "resync"``).
    * **position**: the cluster time the saved cursor stands for (the newest event delivered), or the first
      second a start time replays.
    * **cursor age** = now − that time; **saved** = now − when it was written. Neither is *lag*: an idle
      resource's cursor ages while its watcher is fully caught up, and the watcher saves only when events come.
      Lag (time since a watcher last knew it was at the head of the stream) lives in the running daemon
      only: ``/status`` and ``rwatch_watch_lag_seconds``. What the store can vouch for is the cursor age: if
      it nears ``watch.retention`` while a watcher is down, resuming will lose history.
    * **gaps**: open gaps (history known lost, waiting for a resync to fill it): count and seconds.
    * **lease**: the replica following the resource (``owner``, ``fence``) and when its lease expires; an
      expired lease row shows as free.

    ``--json`` prints the same as one JSON document (times as Unix seconds and ISO-8601 UTC, ages in seconds).

``rwatch cursors reset RESOURCE (--to-now | --to-time T | --by-duration D) [--execute] [--json]``
    Computes the new position and prints the change (old → new); a dry run unless ``--execute``.

    * ``--to-time T``: ISO-8601 (``2024-11-26T10:00:00Z``, an offset, or none = UTC) or Unix seconds.
      ``--by-duration D``: a duration as in the config (``90s``, ``30m``, ``1h30m``), meaning now − D.
      The new position replays every event from T's second on: CMDB returns the events *strictly after*
      ``bk_start_from`` (to the second), so ``bk_start_from = ⌊T⌋ − 1``: a few events of T's own second before T
      may come again, none after T is missed.
    * That start must lie inside the retention window as the watcher sees it: not before
      now − ``watch.retention`` + 60 s (the watcher's ``RESUME_MARGIN``), and not in the future; otherwise exit 2
      with the window.
    * ``--to-now``: the watcher starts "from now" (CMDB's newest event on), as with nothing saved, but without
      the bootstrap gap a missing row means under ``bootstrap = "resync"``: the skip is the operator's choice.
      Skipped history is not recorded as a gap; ``rwatch resync -r RESOURCE`` brings the mirror level.

    Stored form (no schema change, ``CursorState.from_now`` / ``CursorState.starting_at``): "from now" is a
    row with an empty cursor; a start time is a row whose cursor is ``rwatch:start_from:<bk_start_from>`` with
    ``event_time = bk_start_from``. The watcher reads ``CursorState.start_from`` in ``_initial_position`` and
    resumes with ``bk_start_from`` exactly there; an empty cursor sends no ``bk_cursor`` (``watch_body``), which
    *is* "from now".

    ``--execute`` is race-free against running daemons: it takes the resource's lease itself
    (``CursorStore.acquire`` with a unique owner and a 30 s ttl), writes the new position fenced by that lease,
    and releases it. While another owner's lease is live (``expires_at > now``) the reset is refused (exit 1,
    naming the holder and when its lease expires): stop every ``rwatch run`` following the resource (a standby
    takes the lease over within ``lease_ttl``) and run it again. A watcher that starts meanwhile waits for the
    lease, then loads the new position.

Exit codes (DESIGN.md): 0 ok (dry runs included); 1 runtime failure (store unreachable, reset refused by a live
lease); 2 bad usage or configuration (unknown resource, unreadable or out-of-window time, no or several targets).
"""

from __future__ import annotations

import typer

from rwatch.cli.cursors.listing import list_cmd
from rwatch.cli.cursors.reset import reset_cmd

cursors_app = typer.Typer(help="See and reset the saved cursors.", no_args_is_help=True)
cursors_app.command("list")(list_cmd)
cursors_app.command("reset")(reset_cmd)
