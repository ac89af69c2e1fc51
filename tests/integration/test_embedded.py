"""The embedded NATS/Redis servers are real, isolated from system servers, and stop cleanly."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.stack.embedded import (
    EmbeddedInfra,
    EmbeddedNats,
    EmbeddedRedis,
    EmbeddedServerError,
    nats_server_path,
    port_accepts,
    redis_server_path,
)

SYSTEM_PORTS = {4222, 6379}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_binaries_found() -> None:
    assert Path(nats_server_path()).is_file()
    assert Path(redis_server_path()).is_file()


def test_integration_marker_applied(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("integration") is not None


async def test_servers_on_fixture_ports_not_system_ports(
    embedded_infra: EmbeddedInfra,
    nats_url: str,
    redis_url: str,
    nc: NatsClient,
    redis_client: aioredis.Redis,
) -> None:
    nats_port = urlsplit(nats_url).port
    redis_port = urlsplit(redis_url).port
    assert nats_port == embedded_infra.nats.port
    assert redis_port == embedded_infra.redis.port
    assert {nats_port, redis_port}.isdisjoint(SYSTEM_PORTS)
    assert urlsplit(nats_url).hostname == urlsplit(redis_url).hostname == "127.0.0.1"
    # The clients really talk to our processes, not to something else on the port.
    assert nc.connected_url is not None and nc.connected_url.port == nats_port
    info = await redis_client.info("server")
    assert info["tcp_port"] == redis_port
    assert info["process_id"] == embedded_infra.redis.pid
    assert embedded_infra.is_running()


async def test_nats_request_reply(nc: NatsClient) -> None:
    subject = f"test.echo.{uuid.uuid4().hex}"

    async def handler(msg: Msg) -> None:
        await msg.respond(b"echo:" + msg.data)

    sub = await nc.subscribe(subject, cb=handler)
    try:
        reply = await nc.request(subject, b"ping", timeout=2)
        assert reply.data == b"echo:ping"
    finally:
        await sub.unsubscribe()


async def test_jetstream_stream_publish_get(nc: NatsClient) -> None:
    js = nc.jetstream()
    name = f"T{uuid.uuid4().hex[:12]}"
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    try:
        ack = await js.publish(f"{name.lower()}.a", b"hello")
        assert ack.stream == name
        msg = await js.get_msg(name, ack.seq)
        assert msg.data == b"hello"
        assert msg.subject == f"{name.lower()}.a"
    finally:
        await js.delete_stream(name)


async def test_jetstream_object_store_roundtrip(nc: NatsClient) -> None:
    # The project keeps ONNX models in a JetStream object store; a blob larger
    # than one chunk (128 KiB default) proves chunking/reassembly works.
    js = nc.jetstream()
    bucket = f"models-{uuid.uuid4().hex[:12]}"
    obs = await js.create_object_store(bucket)
    try:
        blob = os.urandom(300 * 1024)
        info = await obs.put("drafter.onnx", blob)
        assert info.size == len(blob)
        result = await obs.get("drafter.onnx")
        assert result.data == blob
        assert result.info.name == "drafter.onnx"
    finally:
        await js.delete_object_store(bucket)


async def test_redis_basic_commands(redis_client: aioredis.Redis) -> None:
    assert await redis_client.dbsize() == 0  # flushdb isolation
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == b"v"
    assert await redis_client.rpush("l", "a", "b", "c") == 3
    assert await redis_client.lrange("l", 0, -1) == [b"a", b"b", b"c"]


async def test_redis_fixture_isolated(redis_client: aioredis.Redis) -> None:
    # Runs after test_redis_basic_commands in file order: its keys are gone.
    assert await redis_client.exists("k", "l") == 0


async def test_redis_password(tmp_path: Path) -> None:
    password = "s3cret/with:odd@chars"
    with EmbeddedRedis(password=password, data_dir=tmp_path) as server:
        assert str(server.port) in server.url
        assert server.port not in SYSTEM_PORTS
        # redis-py retries connection errors (AuthenticationError is one) with
        # backoff by default; a rejected login should fail at once here.
        no_retry = Retry(NoBackoff(), 0)
        anon = aioredis.Redis(host="127.0.0.1", port=server.port, retry=no_retry)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await anon.ping()
        finally:
            await anon.aclose()
        wrong = aioredis.Redis(host="127.0.0.1", port=server.port, password="nope", retry=no_retry)
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                await wrong.ping()
        finally:
            await wrong.aclose()
        # The URL carries the (percent-encoded) password.
        authed = aioredis.Redis.from_url(server.url)
        try:
            assert await authed.ping() is True
            await authed.set("x", "1")
            assert await authed.get("x") == b"1"
        finally:
            await authed.aclose()
    assert not server.is_running()


def test_stop_really_ends_processes(tmp_path: Path) -> None:
    infra = EmbeddedInfra(tmp_path, nats_monitor_port=None)
    with infra:
        nats_port, redis_port = infra.nats.port, infra.redis.port
        nats_pid, redis_pid = infra.nats.pid, infra.redis.pid
        assert infra.is_running()
        assert port_accepts("127.0.0.1", nats_port)
        assert port_accepts("127.0.0.1", redis_port)
        # State and logs live under the given directory.
        assert (tmp_path / "nats" / "nats-server.log").is_file()
        assert (tmp_path / "nats" / "jetstream").is_dir()
        assert (tmp_path / "redis" / "redis.log").is_file()
    assert not infra.nats.is_running() and not infra.redis.is_running()
    assert not _pid_alive(nats_pid) and not _pid_alive(redis_pid)
    assert not port_accepts("127.0.0.1", nats_port)
    assert not port_accepts("127.0.0.1", redis_port)
    infra.stop()  # idempotent


def test_stop_idempotent_and_temp_dir_removed() -> None:
    server = EmbeddedNats()
    server.stop()  # never started: no-op
    server.start()
    directory = server.directory
    assert directory.is_dir()
    server.stop()
    server.stop()
    assert not directory.exists()


def test_explicit_port_in_use_fails(embedded_infra: EmbeddedInfra) -> None:
    # Must not mistake the session server for a freshly started one.
    with pytest.raises(EmbeddedServerError, match="already in use"):
        EmbeddedRedis(port=embedded_infra.redis.port).start()
    with pytest.raises(EmbeddedServerError, match="already in use"):
        EmbeddedNats(port=embedded_infra.nats.port).start()


async def test_nats_client_sees_server_stop(tmp_path: Path) -> None:
    import nats

    with EmbeddedNats(data_dir=tmp_path) as server:
        client = await nats.connect(server.url, allow_reconnect=False)
        try:
            await client.flush(timeout=2)
            server.stop()
            for _ in range(100):
                if client.is_closed:
                    break
                await asyncio.sleep(0.02)
            assert client.is_closed
        finally:
            if not client.is_closed:
                await client.close()
