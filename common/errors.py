"""Typed errors that cross a service boundary as an ``ErrorReply`` (``{"type": "ErrorReply",
"v": 1, "error": {"code", "message"}}``).

Services raise (or return) `WispError` with one of the codes below; transport turns it into an
error reply, a log line and a counter, and keeps serving everyone else (docs/architecture.md,
"Failure and bad input"). Two codes mean "try the same round again": CAPACITY (no room now) and
UNAVAILABLE (a dependency failed for a moment); every other code is final for its request.

OVERLOADED answers a session open that admission control refused (admitting one more session
would push the admitted ones past their SLOs). It is final for that open, not retried by any
service: it travels back to the SDK user, with ``retry_after_ms`` (when capacity is expected to
free), who decides whether to try again.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed payload, missing or ill-typed fields
    UNKNOWN_SESSION = "unknown_session"
    OUT_OF_VOCABULARY = "out_of_vocabulary"
    PROMPT_TOO_LONG = "prompt_too_long"
    SEQUENCE_TOO_LONG = "sequence_too_long"  # prompt + output + k_max over the context
    DRAFT_TOO_LONG = "draft_too_long"  # more draft tokens than the session's k_max
    BASE_MISMATCH = "base_mismatch"  # round's base length disagrees with committed tokens
    STALE_ROUND = "stale_round"  # a round older than the last one answered
    SESSION_FINISHED = "session_finished"
    CAPACITY = "capacity"  # no room (KV, verifiers) now; retry later
    OVERLOADED = "overloaded"  # admission control refused a session open; see retry_after_ms
    UNAVAILABLE = "unavailable"  # a transient failure (store, device); retry the same round
    VOCABULARY_MISMATCH = "vocabulary_mismatch"
    INTERNAL = "internal"  # a bug: final


RETRYABLE = frozenset({ErrorCode.CAPACITY, ErrorCode.UNAVAILABLE})


class WispError(Exception):
    """An error with a code. ``retry_after_ms``: when trying again may succeed (OVERLOADED
    sets it; None: no estimate)."""

    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: float | None = None):
        super().__init__(describe(code, message, retry_after_ms))
        self.code = ErrorCode(code)
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


def describe(code: str, message: str, retry_after_ms: float | None = None) -> str:
    """``"code: message"``, with the retry hint when there is one (how errors read in logs)."""
    hint = "" if retry_after_ms is None else f" (retry after {retry_after_ms:.0f} ms)"
    return f"{code}: {message}{hint}"
