"""NATS users and subject permissions (issue 10, item 4): who may publish and subscribe where.

The model is data: :data:`ROLES` maps a role to its grants, each with the reason it exists,
built from the constants of :mod:`common.subjects` (never string copies). Rendering the
nats-server ``authorization`` block and generating passwords are separate functions.

* ``client`` (the SDK, the CLI, loadgen's generators): publish only on the two generate
  subjects (a resume is a generate with ``resume_sid``; the protocol has no cancel message),
  subscribe only on its own inbox prefix ``_INBOX_<user>.>``. The SDK must then connect with
  nats-py's ``inbox_prefix=inbox_prefix(user, "client")``, or its inbox subscription is refused.
* one role per service, with exactly the subjects it uses. A service replies to a request
  through ``allow_responses`` (the server lets it publish on the reply subject of a message it
  received) rather than holding publish on every inbox; a service that makes requests itself
  subscribes on its own inbox prefix ``_INBOX_<role>`` (replicas of a role share it).

One exception to "replies through allow_responses": the verifier answers a ``VerifyRequest``
on the edge's inbox although the request reached it through the scheduler (a batch carries
``reply_to``), so it holds publish on the inboxes of the two roles that submit rounds.

All users live in the global account, where JetStream (the predictor's object store) is on.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from common.subjects import (
    EVENTS_ALL,
    GENERATE_EDGE,
    PREDICTOR_BUCKET,
    PREDICTOR_UPDATED,
    SERVER_GENERATE,
    SESSION_CLOSE,
    SESSION_OPEN,
    SUBJECT_PREFIX,
    VERIFIER_HEARTBEAT,
    VERIFY_SUBMIT,
    check_token,
    is_publish_subject,
    is_safe_token,
)

__all__ = [
    "CLIENT",
    "RESPONSE_TTL_S",
    "ROLES",
    "SERVICE_ROLES",
    "Grant",
    "Role",
    "generate_stack_users",
    "inbox_prefix",
    "is_client_reply_subject",
    "permissions_table",
    "render_authorization",
    "role_subjects",
]

CLIENT = "client"
EDGE = "edge-drafter"
SCHEDULER = "admission-scheduler"
VERIFIER = "gpu-verifier"
PREDICTOR = "predictor"
METRICS = "metrics"
SERVICE_ROLES = (EDGE, SCHEDULER, VERIFIER, PREDICTOR, METRICS)

# A generation streams TokenChunks to the client's inbox until it ends, so a responder may
# send any number of messages on one reply subject, for as long as a session may live
# (common.store.SESSION_TTL_S: an idle session expires then). nats-server forgets a reply
# permission after this time, so the bound also caps the server's memory of old inboxes.
RESPONSE_TTL_S = 3600

# Wildcard forms of the per-verifier subjects (common.subjects.verifier_batch / verifier_done
# build one verifier's; a role's grant covers every verifier id).
_VERIFIER_BATCH_ALL = f"{SUBJECT_PREFIX}.verifier.*.batch"
_VERIFIER_DONE_ALL = f"{SUBJECT_PREFIX}.verifier.*.done"
_EVENTS_ONE = f"{SUBJECT_PREFIX}.events.*"  # common.subjects.event(kind), any kind

# JetStream object store PREDICTOR_BUCKET: the stream behind it is OBJ_<bucket>, its data
# subjects $O.<bucket>.C.<nuid> (chunks) and $O.<bucket>.M.<name> (metadata). API calls
# are requests on $JS.API.<verb>.<stream>...; their answers come back on the caller's inbox.
_OBJ_STREAM = f"OBJ_{PREDICTOR_BUCKET}"
_OBJ_DATA = f"$O.{PREDICTOR_BUCKET}.>"
# Exactly what nats-py 2.16 sends (checked by dropping each grant in turn); another nats-py
# may use other API forms (DIRECT.GET, CONSUMER.CREATE.<stream>.<name>.<filter>), which
# tests/integration/test_nats_auth.py's object-store test would then report.
_JS_READ = (  # look the bucket up, read a metadata entry, list/read through a consumer
    f"$JS.API.STREAM.INFO.{_OBJ_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{_OBJ_STREAM}",
    f"$JS.API.CONSUMER.CREATE.{_OBJ_STREAM}",  # ephemeral ordered consumer, server-deleted
    # nats-py's js.subscribe (object reads, listings) finds the stream of a subject through
    # STREAM.NAMES (a subject filter in the request); it answers names only, no data.
    "$JS.API.STREAM.NAMES",
)
_JS_WRITE = (  # create the bucket (idempotent), drop a pruned object's chunks (delete)
    f"$JS.API.STREAM.CREATE.{_OBJ_STREAM}",
    f"$JS.API.STREAM.PURGE.{_OBJ_STREAM}",
)
# Ordered consumers (object reads, listings) answer the server's flow-control requests on
# large reads (not triggered by the tests' 600 kB; the edge's allow_responses covers it too).
_JS_FLOW_CONTROL = f"$JS.FC.{_OBJ_STREAM}.>"


@dataclass(frozen=True, slots=True)
class Grant:
    subject: str  # may hold * and >; "{inbox}" stands for the user's own inbox prefix
    why: str


@dataclass(frozen=True, slots=True)
class Role:
    publish: tuple[Grant, ...]
    subscribe: tuple[Grant, ...]
    responds: bool = False  # allow_responses: may answer on the reply subject of what it got
    why_responds: str = ""


_OWN_INBOX = "{inbox}.>"


def _inbox_all(role: str) -> str:
    return f"_INBOX_{role}.>"


ROLES: dict[str, Role] = {
    CLIENT: Role(
        publish=(
            Grant(GENERATE_EDGE, "generate (and resume) in the edge modes"),
            Grant(SERVER_GENERATE, "generate (and resume) in centralized and colocated"),
        ),
        subscribe=(Grant(_OWN_INBOX, "its streams' inboxes; nobody else's"),),
    ),
    EDGE: Role(
        publish=(
            Grant(SESSION_OPEN, "request: admission of a new session"),
            Grant(VERIFY_SUBMIT, "request: one round's draft to verify"),
            Grant(SESSION_CLOSE, "a finished session frees its verifier KV"),
            Grant(_EVENTS_ONE, "request, round and refusal events"),
            *(Grant(s, "object store reads: the newest predictor model") for s in _JS_READ),
            Grant(_JS_FLOW_CONTROL, "flow control of the object store's ordered consumer"),
        ),
        subscribe=(
            Grant(GENERATE_EDGE, "serves the edge modes (queue group)"),
            Grant(PREDICTOR_UPDATED, "hot-swaps the rejection predictor"),
            Grant(_OWN_INBOX, "replies to its requests: admission, verify results (straight "
                              "from the verifier), object store answers and chunks"),
        ),
        responds=True,
        why_responds="streams TokenChunks and GenerateDone to the client's inbox",
    ),
    SCHEDULER: Role(
        publish=(
            Grant(_VERIFIER_BATCH_ALL, "dispatches batches to a chosen verifier"),
            Grant(_EVENTS_ONE, "schedule, refusal and error events"),
            # Server modes: the scheduler runs the generation loop itself, as the edge does.
            Grant(SESSION_OPEN, "request (server modes): admission through its own queue"),
            Grant(VERIFY_SUBMIT, "request (server modes): a round to verify"),
            Grant(SESSION_CLOSE, "server modes: a finished session frees its verifier KV"),
        ),
        subscribe=(
            Grant(VERIFIER_HEARTBEAT, "verifier registry: liveness, model, KV capacity"),
            Grant(_VERIFIER_DONE_ALL, "measured batch times (estimator, in-flight accounting)"),
            Grant(SESSION_OPEN, "admission (queue group)"),
            Grant(SESSION_CLOSE, "session table cleanup (queue group)"),
            Grant(VERIFY_SUBMIT, "rounds to batch (queue group)"),
            Grant(SERVER_GENERATE, "serves centralized and colocated (queue group)"),
            Grant(_OWN_INBOX, "replies to its own server-mode requests"),
        ),
        responds=True,
        why_responds="admission and close answers, error replies to a submit, and the "
                     "server modes' token stream to the client's inbox",
    ),
    VERIFIER: Role(
        publish=(
            Grant(_inbox_all(EDGE), "VerifyResult to the submitting edge's inbox "
                                    "(the reply_to carried in the batch)"),
            Grant(_inbox_all(SCHEDULER), "VerifyResult for server-mode rounds"),
            Grant(VERIFIER_HEARTBEAT, "liveness and capacity to the scheduler"),
            Grant(_VERIFIER_DONE_ALL, "batch time and shape to the scheduler"),
            Grant(_EVENTS_ONE, "verdict, batch and error events"),
        ),
        subscribe=(
            Grant(_VERIFIER_BATCH_ALL, "its batches (the id is chosen at start)"),
            Grant(SESSION_CLOSE, "frees a finished session's KV (every verifier hears it)"),
        ),
    ),
    PREDICTOR: Role(
        publish=(
            Grant(PREDICTOR_UPDATED, "announces a newly accepted model"),
            Grant(_OBJ_DATA, "object store writes: model chunks and metadata"),
            *(Grant(s, "object store reads: versions already stored") for s in _JS_READ),
            *(Grant(s, "object store: create the bucket, replace an object") for s in _JS_WRITE),
            Grant(_JS_FLOW_CONTROL, "flow control of the object store's ordered consumer"),
            Grant(_EVENTS_ONE, "error events"),
        ),
        subscribe=(
            Grant(EVENTS_ALL, "training data: rounds and verdicts (queue group)"),
            Grant(_OWN_INBOX, "object store answers, publish acks and listings"),
        ),
    ),
    METRICS: Role(
        publish=(),
        subscribe=(Grant(EVENTS_ALL, "aggregates every event (queue group)"),),
    ),
}


def inbox_prefix(user: str, role: str) -> str:
    """The prefix the user's connection must pass as nats-py's ``inbox_prefix``: its own for a
    client, the role's for a service (replicas share it: the verifier must reach them all)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {sorted(ROLES)}")
    return f"_INBOX_{check_token(user if role == CLIENT else role, 'user')}"


def role_subjects(role: str, user: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects of `user` in `role`, the inbox placeholder filled in."""
    spec = ROLES[role]
    own = inbox_prefix(user, role)

    def fill(grants: tuple[Grant, ...]) -> list[str]:
        return [g.subject.replace("{inbox}", own) for g in grants]

    return fill(spec.publish), fill(spec.subscribe)


def is_client_reply_subject(subject: str) -> bool:
    """Whether a client request's reply subject is a client inbox, the only place a service
    should stream an answer to. nats-server checks no reply subject: allow_responses lets the
    responder publish on whatever reply the requester named, so a client naming
    ``wisp.verifier.v1.batch`` or ``_INBOX_edge-drafter.x`` would have the edge publish there.
    The services that take client requests must refuse such a reply with this check."""
    head, _, rest = subject.partition(".")
    user = head.removeprefix("_INBOX_")
    return (head != user and is_safe_token(user) and user not in SERVICE_ROLES and bool(rest)
            and is_publish_subject(subject))


def _check_users(users: Mapping[str, tuple[str, str]]) -> None:
    for user, (role, password) in users.items():
        check_token(user, "user")
        if role not in ROLES:
            raise ValueError(f"user {user!r}: unknown role {role!r}; known: {sorted(ROLES)}")
        # A client's inbox is _INBOX_<user>: named after a service role it would read that
        # role's inbox (the verifier's answers to every edge).
        if role == CLIENT and user in SERVICE_ROLES:
            raise ValueError(f"client user {user!r} may not be named after a service role")
        if not password or password.startswith("$") or any(c in password for c in "\"\\\n"):
            # "$2a$..." would be read as a bcrypt hash; quotes would break the config.
            raise ValueError(f"user {user!r}: password is empty or has characters the "
                             f"config cannot hold")


def render_authorization(users: Mapping[str, tuple[str, str]]) -> str:
    """The nats-server config ``authorization { users = [...] }`` block for user -> (role,
    password). Passwords are written in clear: the file must be owner-only."""
    _check_users(users)
    q = json.dumps  # nats-server's config reads JSON strings
    lines = ["authorization {", "  users = ["]
    for user, (role, password) in sorted(users.items()):
        pub, sub = role_subjects(role, user)
        perms = [f"publish: {{ allow: [{', '.join(map(q, pub))}] }}" if pub
                 else 'publish: { deny: [">"] }',
                 f"subscribe: {{ allow: [{', '.join(map(q, sub))}] }}" if sub
                 else 'subscribe: { deny: [">"] }']
        if ROLES[role].responds:
            perms.append(f'allow_responses: {{ max: -1, expires: "{RESPONSE_TTL_S}s" }}')
        lines += [f"    {{ user: {q(user)}, password: {q(password)}, permissions: {{",
                  *(f"        {p}" for p in perms),
                  "    } }"]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def generate_stack_users(client_users: tuple[str, ...] = (CLIENT,)
                         ) -> dict[str, tuple[str, str]]:
    """Fresh credentials for a stack: one user per service role (named after it; replicas
    share it) and the given client users, each with 256 random bits as password."""
    users = {role: (role, secrets.token_urlsafe(32)) for role in SERVICE_ROLES}
    for user in client_users:
        if user in users:
            raise ValueError(f"client user {user!r} clashes with a service user")
        users[user] = (CLIENT, secrets.token_urlsafe(32))
    _check_users(users)
    return users


def permissions_table() -> str:
    """The matrix as a Markdown table (docs/security.md holds a copy; a test compares)."""
    rows = ["| role | may publish | may subscribe | answers requests |", "|---|---|---|---|"]

    def cell(grants: tuple[Grant, ...]) -> str:
        return "<br>".join(f"`{g.subject}` ({g.why})" for g in grants) or "nothing"

    for name, role in ROLES.items():
        responds = f"yes: {role.why_responds}" if role.responds else "no"
        rows.append(f"| `{name}` | {cell(role.publish)} | {cell(role.subscribe)} | {responds} |")
    return "\n".join(rows) + "\n"
