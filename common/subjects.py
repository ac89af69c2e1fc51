"""NATS subjects, queue groups and Redis keys (docs/architecture.md), in one place.

Ids that become part of a subject or a key are checked here, so that a session id like
``"a.b"``, ``"*"``, ``">"`` or ``"x:tokens"`` can never address someone else's subject or key:

* a *safe token* (session, verifier, batch ids; event kinds) is 1-128 characters of
  ``A-Z a-z 0-9 _ -``: no dots, spaces, wildcards or colons;
* a *name* (model, hardware, device and policy names, used only in Redis keys and values) may
  also hold ``. / @ +`` (``Qwen/Qwen2.5-0.5B``) but still no spaces, colons or wildcards;
  :func:`to_name` turns a free-form name such as ``"NVIDIA H100 80GB HBM3"`` into one.

Builders raise ``ValueError`` on an unsafe id: ids reaching them have already been through the
protocol's validation, so a failure here is a bug, not bad input.
"""

from __future__ import annotations

import re

__all__ = [
    "DEADLINES_KEY",
    "EDGE_QUEUE",
    "EVENTS_ALL",
    "GENERATE_EDGE",
    "KEY_PREFIX",
    "METRICS_QUEUE",
    "NAME_RE",
    "PREDICTOR_QUEUE",
    "PREDICTOR_UPDATED",
    "SAFE_TOKEN_RE",
    "SCHEDULER_QUEUE",
    "SERVER_GENERATE",
    "SESSION_CLOSE",
    "SESSION_OPEN",
    "SUBJECT_PREFIX",
    "VERIFIERS_KEY",
    "VERIFIER_HEARTBEAT",
    "VERIFY_SUBMIT",
    "check_name",
    "check_token",
    "deadline_member",
    "estimator_key",
    "event",
    "is_name",
    "is_publish_subject",
    "is_safe_token",
    "parse_deadline_member",
    "session_key",
    "session_tokens_key",
    "to_name",
    "verifier_batch",
    "verifier_done",
]

SAFE_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
NAME_RE = re.compile(r"[A-Za-z0-9_.@+/-]{1,256}")
# A subject one may publish to (a reply inbox): dot-separated non-empty tokens, no whitespace,
# no wildcards.
_PUBLISH_SUBJECT_RE = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
_MAX_SUBJECT_LEN = 512

# -- NATS subjects ----------------------------------------------------------------------------
SUBJECT_PREFIX = "wisp"
GENERATE_EDGE = "wisp.edge.generate"  # SDK -> edge-drafter (queue group)
SERVER_GENERATE = "wisp.server.generate"  # SDK -> admission-scheduler (centralized, colocated)
SESSION_OPEN = "wisp.session.open"  # edge -> admission-scheduler
SESSION_CLOSE = "wisp.session.close"  # edge -> admission-scheduler
VERIFY_SUBMIT = "wisp.verify.submit"  # edge -> admission-scheduler (queue group)
VERIFIER_HEARTBEAT = "wisp.verifier.heartbeat"  # verifier -> scheduler
EVENTS_ALL = "wisp.events.>"  # metrics and predictor subscribe to every event kind
PREDICTOR_UPDATED = "wisp.predictor.updated"  # predictor -> edge-drafters
PREDICTOR_BUCKET = "wisp-predictor"  # JetStream object store of accepted predictor models

# Event kinds (the last token of wisp.events.{kind}) are the type tags of the event structs
# in common.protocol ("request", "round", "verdict", "batch", "error").

# Queue groups: members of one group share the subject's messages (one member gets each).
EDGE_QUEUE = "wisp-edge-drafters"
SCHEDULER_QUEUE = "wisp-schedulers"
METRICS_QUEUE = "wisp-metrics"
PREDICTOR_QUEUE = "wisp-predictors"


def is_safe_token(value: object) -> bool:
    return isinstance(value, str) and SAFE_TOKEN_RE.fullmatch(value) is not None


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def is_publish_subject(value: object) -> bool:
    return (isinstance(value, str) and len(value) <= _MAX_SUBJECT_LEN
            and _PUBLISH_SUBJECT_RE.fullmatch(value) is not None)


def check_token(value: object, what: str = "id") -> str:
    if not is_safe_token(value):
        raise ValueError(f"{what} must be 1-128 characters of A-Z a-z 0-9 _ - "
                         f"(no dots, spaces, wildcards or colons), got {value!r:.80}")
    return value  # type: ignore[return-value]


def check_name(value: object, what: str = "name") -> str:
    if not is_name(value):
        raise ValueError(f"{what} must be 1-256 characters of A-Z a-z 0-9 _ - . / @ + "
                         f"(no spaces, colons or wildcards), got {value!r:.80}")
    return value  # type: ignore[return-value]


def to_name(raw: str) -> str:
    """A free-form name (``torch.cuda.get_device_name()``) as a valid name: runs of other
    characters become one ``-``. Deterministic, so every service derives the same key."""
    name = re.sub(r"[^A-Za-z0-9_.@+/-]+", "-", raw).strip("-")[:256]
    return name or "unknown"


def verifier_batch(vid: str) -> str:
    """Scheduler -> one verifier: a batch to run."""
    return f"wisp.verifier.{check_token(vid, 'verifier id')}.batch"


def verifier_done(vid: str) -> str:
    """Verifier -> scheduler: measured batch time and shape."""
    return f"wisp.verifier.{check_token(vid, 'verifier id')}.done"


def event(kind: str) -> str:
    return f"wisp.events.{check_token(kind, 'event kind')}"


# -- Redis keys -------------------------------------------------------------------------------
KEY_PREFIX = "wisp:"
DEADLINES_KEY = "wisp:deadlines"  # sorted set: "sid:round" -> absolute server deadline (ms)
VERIFIERS_KEY = "wisp:verifiers"  # hash: verifier id -> model, KV capacity, last heartbeat


def session_key(sid: str) -> str:
    """Hash (TTL): mode, verifier id, committed length, SLO, device id, times, state."""
    return f"wisp:sess:{check_token(sid, 'session id')}"


def session_tokens_key(sid: str) -> str:
    """List: the session's committed token ids (prompt + accepted output)."""
    return f"wisp:sess:{check_token(sid, 'session id')}:tokens"


def estimator_key(model: str, hardware: str) -> str:
    """Hash: a, b_compute, b_read, c, R², MAE, fitted_at (docs/architecture.md)."""
    return f"wisp:estimator:{check_name(model, 'model')}:{check_name(hardware, 'hardware')}"


def deadline_member(sid: str, round: int) -> str:
    """Member of DEADLINES_KEY for one pending round."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"round must be an integer >= 0, got {round!r}")
    return f"{check_token(sid, 'session id')}:{round}"


def parse_deadline_member(member: str | bytes) -> tuple[str, int]:
    """Inverse of :func:`deadline_member` (Redis may hand back bytes)."""
    text = member.decode() if isinstance(member, bytes) else member
    sid, sep, round_text = text.rpartition(":")
    if not sep or not is_safe_token(sid) or not (round_text.isascii() and round_text.isdigit()):
        raise ValueError(f"not a deadline member 'sid:round': {text!r:.80}")
    return sid, int(round_text)
