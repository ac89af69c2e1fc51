"""The NATS permission model (common.transport.nats_auth) against a real nats-server started
with the rendered `authorization` block: clients are confined to generating and their own
inbox, each service to its subjects, and wrong passwords are refused."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from common.subjects import (
    EDGE_QUEUE,
    EVENTS_ALL,
    GENERATE_EDGE,
    PREDICTOR_UPDATED,
    SCHEDULER_QUEUE,
    SERVER_GENERATE,
    SESSION_OPEN,
    VERIFY_SUBMIT,
    event,
    verifier_batch,
    verifier_done,
)
from common.transport import nats_auth
from common.transport.nats_auth import (
    CLIENT,
    ROLES,
    generate_stack_users,
    inbox_prefix,
    render_authorization,
    role_subjects,
)
from common.transport.predictor_store import fetch_newest, newest_version, publish_model
from services.stack.embedded import find_free_port, nats_server_path

USERS = generate_stack_users(("alice", "bob"))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"


@pytest.fixture(scope="module")
def auth_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("nats-auth")
    conf, log = tmp / "nats.conf", tmp / "nats.log"
    conf.write_text(render_authorization(USERS))
    conf.chmod(0o600)
    port = find_free_port()
    proc = subprocess.Popen([nats_server_path(), "-c", str(conf), "-a", "127.0.0.1",
                             "-p", str(port), "-js", "-sd", str(tmp / "js"), "-l", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "Server is ready" in log.read_text()):
            assert proc.poll() is None, f"nats-server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


class Conn:
    """A connection as `user`, its inbox prefix set, collecting the errors the server sends."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []
        self.nc: NatsClient | None = None

    def violations(self) -> list[str]:
        # nats-py reports "-ERR 'Permissions Violation ...'" lowercased, through error_cb.
        return [str(e) for e in self.errors if "permissions violation" in str(e)]


@pytest_asyncio.fixture
async def connect(auth_url: str) -> AsyncIterator:
    conns: list[Conn] = []

    async def _connect(user: str) -> Conn:
        role, password = USERS[user]
        conn = Conn()

        async def on_error(exc: Exception) -> None:
            conn.errors.append(exc)

        conn.nc = await nats.connect(auth_url, user=user, password=password,
                                     inbox_prefix=inbox_prefix(user, role), error_cb=on_error,
                                     allow_reconnect=False, connect_timeout=5)
        conns.append(conn)
        return conn

    yield _connect
    for conn in conns:
        if conn.nc is not None and not conn.nc.is_closed:
            with contextlib.suppress(Exception):
                await conn.nc.close()


async def _settle(*conns: Conn) -> None:
    """Round-trip every connection, so that the server's -ERR for what was sent has arrived."""
    for conn in conns:
        await conn.nc.flush(timeout=5)
    await asyncio.sleep(0.05)


@pytest.mark.parametrize(("subject", "server"), [(GENERATE_EDGE, "edge-drafter"),
                                                 (SERVER_GENERATE, "admission-scheduler")])
async def test_client_generates_and_gets_the_stream_on_its_inbox(connect, subject: str,
                                                                 server: str) -> None:
    edge, client = await connect(server), await connect("alice")

    async def serve(msg) -> None:  # a stream: several messages on one reply subject
        for part in (b"tok1", b"tok2", b"done"):
            await msg.respond(part)

    await edge.nc.subscribe(subject, queue=EDGE_QUEUE, cb=serve)
    await _settle(edge)
    inbox = client.nc.new_inbox()
    assert inbox.startswith("_INBOX_alice.")
    sub = await client.nc.subscribe(inbox)
    await client.nc.publish(subject, b"prompt", reply=inbox)
    got = [(await sub.next_msg(timeout=5)).data for _ in range(3)]
    assert got == [b"tok1", b"tok2", b"done"]
    reply = await client.nc.request(subject, b"again", timeout=5)  # nats-py's request mux
    assert reply.data == b"tok1"
    assert edge.violations() == [] and client.violations() == []


@pytest.mark.parametrize("subject", [">", "wisp.>", "_INBOX.>", "_INBOX_bob.>",
                                     "_INBOX_edge-drafter.>", EVENTS_ALL])
async def test_client_cannot_subscribe_beyond_its_inbox(connect, subject: str) -> None:
    alice, bob = await connect("alice"), await connect("bob")
    sub = await alice.nc.subscribe(subject)
    await _settle(alice)
    assert any(subject.lower() in v for v in alice.violations()), alice.errors
    # Nothing leaks either: bob's stream is not delivered to alice's refused subscription.
    await bob.nc.publish(bob.nc.new_inbox(), b"secret")
    await _settle(bob)
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.2)


@pytest.mark.parametrize("subject", [VERIFY_SUBMIT, SESSION_OPEN, verifier_batch("v1"),
                                     verifier_done("v1"), event("round"), PREDICTOR_UPDATED])
async def test_client_cannot_publish_on_service_subjects(connect, subject: str) -> None:
    scheduler, verifier, metrics, edge = [await connect(u) for u in (
        "admission-scheduler", "gpu-verifier", "metrics", "edge-drafter")]
    subs = [await scheduler.nc.subscribe(s, queue=SCHEDULER_QUEUE)
            for s in (VERIFY_SUBMIT, SESSION_OPEN)]
    subs += [await scheduler.nc.subscribe("wisp.verifier.*.done"),
             await verifier.nc.subscribe(verifier_batch("v1")),
             await metrics.nc.subscribe(EVENTS_ALL),
             await edge.nc.subscribe(PREDICTOR_UPDATED)]
    await _settle(scheduler, verifier, metrics, edge)
    client = await connect("alice")
    await client.nc.publish(subject, b"forged")
    await _settle(client)
    assert any(subject.lower() in v for v in client.violations()), client.errors
    for sub in subs:
        with pytest.raises(nats.errors.TimeoutError):
            await sub.next_msg(timeout=0.1)


async def test_wrong_password_is_refused(auth_url: str) -> None:
    for user, password in (("alice", "wrong"), ("alice", USERS["bob"][1]), ("nobody", "x")):
        # nats-py 2.16 raises the server's -ERR during connect as a plain nats.errors.Error.
        with pytest.raises(nats.errors.Error, match="(?i)authorization violation"):
            await nats.connect(auth_url, user=user, password=password, allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=3)
    with pytest.raises(nats.errors.Error, match="(?i)authorization violation"):  # no user
        await nats.connect(auth_url, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=3)


@pytest.mark.parametrize("role", nats_auth.SERVICE_ROLES)
async def test_each_service_subscribes_to_its_subjects(connect, role: str) -> None:
    conn = await connect(role)
    _, subscribe = role_subjects(role, role)
    for subject in subscribe:
        await conn.nc.subscribe(subject)
    await _settle(conn)
    assert conn.violations() == []


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def _concrete(subject: str) -> str:
    return subject.replace(".>", ".x").replace("*", "v1")


async def test_every_service_publish_reaches_its_subscribers(connect) -> None:
    """Each (publisher role, subject, subscriber role) the matrix allows actually flows."""
    conns = {role: await connect(role) for role in nats_auth.SERVICE_ROLES}
    flows = []
    for pub_role in nats_auth.SERVICE_ROLES:
        for subject in map(_concrete, role_subjects(pub_role, pub_role)[0]):
            if subject.startswith("$"):
                continue  # JetStream API / object store: exercised through predictor_store
            for sub_role in nats_auth.SERVICE_ROLES:
                for pattern in role_subjects(sub_role, sub_role)[1]:
                    if _matches(pattern, subject) and sub_role != pub_role:
                        flows.append((pub_role, subject, sub_role))
    assert flows
    for pub_role, subject, sub_role in flows:  # one at a time: subjects overlap
        sub = await conns[sub_role].nc.subscribe(subject)
        await _settle(conns[sub_role])
        await conns[pub_role].nc.publish(subject, f"{pub_role}->{sub_role}".encode())
        await conns[pub_role].nc.flush(timeout=5)
        assert (await sub.next_msg(timeout=5)).data == f"{pub_role}->{sub_role}".encode()
        await sub.unsubscribe()
    # The verifier's answer to an edge's (and a server-mode scheduler's) verify request.
    assert ("gpu-verifier", "_INBOX_edge-drafter.x", "edge-drafter") in flows
    assert ("gpu-verifier", "_INBOX_admission-scheduler.x", "admission-scheduler") in flows
    await _settle(*conns.values())
    assert {r: c.violations() for r, c in conns.items()} == {r: [] for r in conns}


async def test_service_requests_and_allow_responses(connect) -> None:
    """An edge's request is answered by the scheduler through allow_responses, and the
    scheduler still cannot publish on arbitrary inboxes otherwise."""
    edge, scheduler = await connect("edge-drafter"), await connect("admission-scheduler")

    async def answer(msg) -> None:
        await msg.respond(b"opened")

    await scheduler.nc.subscribe(SESSION_OPEN, queue=SCHEDULER_QUEUE, cb=answer)
    await _settle(scheduler)
    reply = await edge.nc.request(SESSION_OPEN, b"open", timeout=5)
    assert reply.data == b"opened"
    await scheduler.nc.publish("_INBOX_alice.unsolicited", b"x")
    await _settle(scheduler)
    assert scheduler.violations(), "publishing on an inbox nobody asked from must be refused"


async def test_predictor_object_store_under_role_permissions(connect) -> None:
    predictor, edge = await connect("predictor"), await connect("edge-drafter")
    watched = await edge.nc.subscribe(PREDICTOR_UPDATED)
    await _settle(edge)
    assert await newest_version(edge.nc) == 0  # no bucket yet: the edge may not create it
    await publish_model(predictor.nc, b"model-1" * 1000, "m1", 0.5)
    # Many chunks; keep=1 prunes version 1 (a delete: a purge of its chunks).
    ann = await publish_model(predictor.nc, b"model-2" * 200_000, "m2", 0.5, keep=1)
    assert await newest_version(predictor.nc) == ann.version == 2
    await watched.next_msg(timeout=5)
    newest = await fetch_newest(edge.nc)
    assert newest is not None and newest[1] == b"model-2" * 200_000
    await _settle(predictor, edge)
    assert predictor.violations() == [] and edge.violations() == []


def test_client_user_named_after_a_service_role_is_refused() -> None:
    with pytest.raises(ValueError, match="service role"):
        render_authorization({"gpu-verifier": (CLIENT, "pw")})
    with pytest.raises(ValueError, match="unknown role"):
        render_authorization({"x": ("root", "pw")})


def test_docs_table_matches_the_model() -> None:
    assert nats_auth.permissions_table() in DOCS.read_text(), (
        "docs/security.md is out of date: paste nats_auth.permissions_table() into it")


def test_every_role_has_a_reason_for_every_grant() -> None:
    for role in ROLES.values():
        assert all(g.why for g in role.publish + role.subscribe)
        assert not role.responds or role.why_responds


def test_client_reply_subjects() -> None:
    assert nats_auth.is_client_reply_subject("_INBOX_alice.abc123")
    assert nats_auth.is_client_reply_subject("_INBOX_alice.abc.1")
    for bad in ("wisp.verifier.v1.batch", "_INBOX.abc", "_INBOX_edge-drafter.abc",
                "_INBOX_gpu-verifier.x", "_INBOX_alice", "_INBOX_alice.*", "_INBOX_alice.>",
                "_INBOX_.x", "_INBOX_a b.x", ""):
        assert not nats_auth.is_client_reply_subject(bad), bad
