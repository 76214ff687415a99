"""How a failed watch call is named, paused and reported: its outcome, the CMDB backoff, the slow retry of a refusal.

Transport errors, 5xx, 429, malformed replies and other codes keep the position and back off with jitter (the CMDB
policy, on the watcher's kept wait: 0.8 s doubling to 30 s, reset after 2 min healthy). A refusal of *who* asks
(``CmdbRefused``) is retried every ``cmdb.refusal_retry`` instead, with one ``cmdb_refused`` error naming the fix,
and ``/readyz`` fails with it until CMDB accepts us again. A position the server refused was already replaced
(``Repoll``): the next call goes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tenacity import RetryCallState
from tenacity.wait import wait_base

from rwatch import metrics as m
from rwatch.errors import (
    TRANSIENT_ERRORS,
    CmdbRateLimited,
    CmdbRefused,
    CmdbTransientError,
    CursorExpired,
    PermanentError,
    RwatchError,
    StartOutOfWindow,
)
from rwatch.progress import WatchState
from rwatch.retry import HealthyResetWait


class Repoll(Exception):
    """The position changed after a cursor loss; poll again at once."""


RETRYABLE = (*TRANSIENT_ERRORS, PermanentError, Repoll)


def outcome(exc: BaseException | None) -> str:
    """The ``outcome`` label of a failed watch call (rwatch_watch_requests_total, watch_failed)."""
    if isinstance(exc, CursorExpired):
        return "cursor_expired"
    if isinstance(exc, StartOutOfWindow):
        return "start_out_of_window"
    if isinstance(exc, CmdbRateLimited):
        return "rate_limited"
    if isinstance(exc, CmdbRefused):
        return "refused"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, CmdbTransientError) and exc.extra.get("reason") == "malformed":
        return "malformed"
    return "transient"


class PollPause(wait_base):
    """The wait between watch calls of one resource (a tenacity wait) and its ``before_sleep`` report."""

    def __init__(self, state: WatchState, backoff: HealthyResetWait, refusal_retry: Callable[[], float],
                 log: Any) -> None:
        self.state = state
        self.backoff = backoff
        self.refusal_retry = refusal_retry  # cmdb.refusal_retry
        self.log = log

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, Repoll):
            return 0.0
        if isinstance(exc, CmdbRefused):
            # Minutes, not a hot loop: nothing changes until someone grants or fixes something, and then the next
            # attempt picks it up without a restart. Jittered so replicas do not knock in step.
            return self.refusal_retry() * (0.9 + 0.2 * self.backoff.rng.random())
        return self.backoff.next_delay()

    def failed(self, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, Repoll):
            return
        reason = outcome(exc)
        resource, mode = self.state.resource, self.state.mode
        m.WATCH_BACKOFFS.labels(resource, reason).inc()
        if isinstance(exc, CmdbRefused):
            self._refused(exc, retry_state.upcoming_sleep)
            return
        fields = exc.fields() if isinstance(exc, RwatchError) else {"error": repr(exc)}
        # A malformed reply is no network hiccup: something between CMDB and us (or CMDB itself) answers wrong.
        level = self.log.error if isinstance(exc, PermanentError) or reason == "malformed" else self.log.warning
        level("watch_failed", **{**fields, "outcome": reason, "mode": mode,
                                 "retry_in": round(retry_state.upcoming_sleep, 2),
                                 "attempt": retry_state.attempt_number})

    def _refused(self, exc: CmdbRefused, retry_in: float) -> None:
        """One clear error per attempt (every ``cmdb.refusal_retry``) naming the fix; ``/readyz`` fails with it."""
        state = self.state
        m.CMDB_REFUSALS.labels(state.resource, exc.reason).inc()
        since = state.refused["since"] if state.refused is not None else state.clock()
        state.refused = {"reason": exc.reason, "code": exc.code, "status": exc.extra.get("status"),
                         "api": exc.extra.get("api"), "error": exc.message, "fix": exc.fix, "since": since}
        self.log.error("cmdb_refused", **{**exc.fields(), "reason": exc.reason, "mode": state.mode,
                                          "retry_in": round(retry_in, 1)})

    def accepted(self) -> None:
        """A call succeeded: a refusal, if any, is over."""
        state = self.state
        if state.refused is not None:
            self.log.info("cmdb_accepted", refused_for_s=round(state.clock() - float(str(state.refused["since"])), 1))
            state.refused = None
