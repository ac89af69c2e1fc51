"""Fixtures for integration tests: real NATS (JetStream) and Redis on free loopback ports.

One pair of servers serves the whole session (starting them costs ~0.2 s each,
per-test servers would dominate the run); tests are isolated by `flushdb()` and
by using their own subjects/streams. The system servers on 4222/6379 that may
exist on a developer machine are never used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient

from services.stack.embedded import EmbeddedInfra

_INTEGRATION_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs real NATS/Redis servers (started embedded, on free ports)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest hook sees every collected item of the session, not only this
    # directory's, so filter by path.
    for item in items:
        if _INTEGRATION_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def embedded_infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedInfra]:
    infra = EmbeddedInfra(tmp_path_factory.mktemp("embedded-infra"))
    infra.start()
    try:
        yield infra
    finally:
        infra.stop()


@pytest.fixture(scope="session")
def nats_url(embedded_infra: EmbeddedInfra) -> str:
    return embedded_infra.nats_url


@pytest.fixture(scope="session")
def redis_url(embedded_infra: EmbeddedInfra) -> str:
    return embedded_infra.redis_url


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    # No reconnect loop: if the server is gone the test should fail, not hang.
    client = await nats.connect(nats_url, allow_reconnect=False, connect_timeout=5)
    try:
        yield client
    finally:
        if not client.is_closed:
            try:
                await client.drain()
            finally:
                if not client.is_closed:
                    await client.close()


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()
