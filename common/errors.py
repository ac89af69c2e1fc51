"""Typed errors that cross a service boundary as `{"v": 1, "error": {"code", "message"}}`.

Cores raise (or return) `WispError` with one of the codes below; transport turns it into an
error reply, a log line and a counter, and keeps serving everyone else (DESIGN.md §10).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"  # malformed payload, missing or ill-typed fields
    UNKNOWN_SESSION = "unknown_session"
    OUT_OF_VOCABULARY = "out_of_vocabulary"
    PROMPT_TOO_LONG = "prompt_too_long"
    SEQUENCE_TOO_LONG = "sequence_too_long"
    DRAFT_TOO_LONG = "draft_too_long"  # more draft tokens than k_max
    BASE_MISMATCH = "base_mismatch"  # round's base length disagrees with committed tokens
    STALE_ROUND = "stale_round"  # a round older than the last one answered
    SESSION_FINISHED = "session_finished"
    CAPACITY = "capacity"  # no KV room even after evicting idle sessions; retry later
    VOCABULARY_MISMATCH = "vocabulary_mismatch"
    INTERNAL = "internal"


class WispError(Exception):
    def __init__(self, code: ErrorCode, message: str):
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message

    def to_dict(self) -> dict:
        return {"code": str(self.code), "message": self.message}
