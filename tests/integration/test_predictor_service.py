"""The rejection predictor over real NATS (JetStream object store): storing, announcing and
following models, and the predictor service learning from live verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import nats
import numpy as np
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from prometheus_client.parser import text_string_to_metric_families

from common.engine.predictor.model import RejectionModel, TrainSettings, export_onnx, fit
from common.engine.predictor.runtime import PredictorSlot
from common.protocol import PredictorUpdated, RoundEvent, VerdictEvent, encode
from common.subjects import PREDICTOR_UPDATED
from common.subjects import event as event_subject
from common.transport.predictor_store import (
    PredictorFollower,
    fetch,
    fetch_newest,
    publish_model,
)
from common.transport.service import publish_event, start_http
from services.predictor.service import PredictorConfig, PredictorService
from services.stack.embedded import EmbeddedNats
from tests.unit.test_predictor_live import synthetic_round

MODEL_VERSIONS = ("t-good", "t-bad")


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    """Two small real models (exporting takes seconds: once per module): "t-good" learned the
    synthetic rule, "t-bad" its opposite (it stops where tokens are accepted)."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for _ in range(150):
        feats, num_accepted = synthetic_round(rng)
        rows += feats
        labels += [j < num_accepted for j in range(len(feats))]
    x, y = np.asarray(rows, np.float32), np.asarray(labels)
    out = {}
    for version, accepted in zip(MODEL_VERSIONS, (y, ~y), strict=True):
        model = fit(RejectionModel(), x, accepted, TrainSettings(epochs=60))
        out[version] = export_onnx(model, {"version": version, "threshold": 0.5})
    return out


@pytest_asyncio.fixture
async def bucket(nc: NatsClient) -> AsyncIterator[str]:
    """A bucket of this test's own, deleted afterwards (the servers serve the whole session)."""
    name = f"wisp-predictor-test-{uuid.uuid4().hex[:8]}"
    yield name
    with contextlib.suppress(NotFoundError):  # a test that never created it
        await nc.jetstream().delete_object_store(name)


async def until(check: Callable[[], bool | Awaitable[bool]], what: str,
                timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- the object store and the follower --------------------------------------------------------
async def test_store_round_trip_and_follower_keeps_the_last_good_model(
        nc: NatsClient, bucket: str, models: dict[str, bytes]) -> None:
    assert await fetch_newest(nc, bucket) is None  # no bucket yet: None, no crash

    ann = await publish_model(nc, models["t-good"], "t-good", 0.5, bucket=bucket)
    assert (ann.version, ann.object_name, ann.model_version) == (1, "predictor-v1.onnx", "t-good")
    newest = await fetch_newest(nc, bucket)
    assert newest is not None and newest[0] == ann and newest[1] == models["t-good"]
    assert await fetch(nc, ann, bucket) == models["t-good"]

    # A follower starting now installs the newest stored model over what its owner put first.
    slot = PredictorSlot()
    assert slot.install(models["t-bad"], "shipped-file")
    follower = PredictorFollower(nc, slot, bucket)
    await follower.start()
    try:
        assert slot.version == "t-good" and follower.version == 1

        # Bytes that are not a model, stored and announced with their own (matching) sha256:
        # fetched, refused by the slot's checks.
        garbage = await publish_model(nc, b"not an onnx model", "t-garbage", 0.5, bucket=bucket)
        await until(lambda: follower.counts["refused"] == 1, "the garbage to be refused")
        # An announcement whose sha256 is not the stored bytes' (a real model under it).
        real = await publish_model(nc, models["t-bad"], "t-bad", 0.5, bucket=bucket)
        # That one was installed; now announce a newer version that points at it with a sha
        # of other bytes.
        await until(lambda: follower.version == real.version, "t-bad to be installed")
        assert slot.version == "t-bad"
        liar = PredictorUpdated(version=real.version + 1, object_name=real.object_name,
                                sha256="0" * 64, model_version="t-liar", threshold=0.5)
        await nc.publish(PREDICTOR_UPDATED, encode(liar))
        # An announcement of an object that is not there.
        ghost = PredictorUpdated(version=real.version + 2, object_name="predictor-v99.onnx",
                                 sha256=garbage.sha256)
        await nc.publish(PREDICTOR_UPDATED, encode(ghost))
        # Malformed announcements: not msgpack, and a map with an ill-typed field.
        await nc.publish(PREDICTOR_UPDATED, b"\xc1 definitely not msgpack")
        raw = msgspec.msgpack.decode(encode(ann))
        raw["sha256"] = "not-hex"
        await nc.publish(PREDICTOR_UPDATED, msgspec.msgpack.encode(raw))
        # A stale announcement (a version it has already passed).
        await nc.publish(PREDICTOR_UPDATED, encode(ann))
        await until(lambda: follower.counts["refused"] == 3
                    and follower.counts["malformed"] == 2
                    and follower.counts["stale"] >= 1, "the bad announcements to be handled")
        assert slot.version == "t-bad" and follower.version == real.version  # the last good

        # And it still follows: a good model announced after all that is installed.
        after = await publish_model(nc, models["t-good"], "t-good", 0.5, bucket=bucket)
        assert after.version == real.version + 1  # the sequence counts stored objects only
        await until(lambda: follower.version == after.version, "the next good model")
        assert slot.version == "t-good"
    finally:
        await follower.stop()

    # A newest stored object that is not a model: a new follower keeps its own model.
    await publish_model(nc, b"\x00" * 10, "t-zeros", 0.5, bucket=bucket)
    slot2 = PredictorSlot()
    assert slot2.install(models["t-bad"], "shipped-file")
    follower2 = PredictorFollower(nc, slot2, bucket)
    await follower2.start()
    try:
        assert slot2.version == "t-bad" and follower2.version == 0
    finally:
        await follower2.stop()


async def test_publish_refuses_a_stale_version_and_prunes_old_objects(
        nc: NatsClient, bucket: str, models: dict[str, bytes]) -> None:
    for _ in range(3):
        await publish_model(nc, models["t-good"], "t-good", 0.5, bucket=bucket, keep=2)
    with pytest.raises(ValueError, match="not newer"):
        await publish_model(nc, models["t-good"], "t-good", 0.5, bucket=bucket, version=3)
    store = await nc.jetstream().object_store(bucket)
    names = sorted(info.name for info in await store.list(ignore_deletes=True))
    assert names == ["predictor-v2.onnx", "predictor-v3.onnx"]
    with pytest.raises(ValueError, match="cannot announce"):
        await publish_model(nc, models["t-good"], "no spaces allowed", 0.5, bucket=bucket)


class NatsWithoutJetStream(EmbeddedNats):
    """A real nats-server with JetStream off, as an operator's own NATS may be."""

    def _command(self, port: int, directory: Path) -> list[str]:
        cmd = super()._command(port, directory)
        i = cmd.index("-js")
        return cmd[:i] + cmd[i + 3:]  # -js -sd DIR


async def test_without_jetstream_the_follower_keeps_its_model(
        tmp_path: Path, models: dict[str, bytes]) -> None:
    with NatsWithoutJetStream(data_dir=tmp_path) as server:
        client = await nats.connect(server.url, allow_reconnect=False)
        try:
            assert await fetch_newest(client) is None  # logged, not raised
            slot = PredictorSlot()
            assert slot.install(models["t-good"], "shipped-file")
            follower = PredictorFollower(client, slot)
            await follower.start()
            assert slot.version == "t-good" and follower.version == 0
            await follower.stop()
            with pytest.raises(NatsError):
                await publish_model(client, models["t-good"], "t-good", 0.5)
        finally:
            await client.close()


# -- the predictor service --------------------------------------------------------------------
@pytest_asyncio.fixture
async def make_service(nc: NatsClient, bucket: str
                       ) -> AsyncIterator[Callable[..., Awaitable[tuple[PredictorService, str]]]]:
    started: list[tuple[PredictorService, aiohttp.web.AppRunner]] = []

    async def make(**config) -> tuple[PredictorService, str]:
        service = PredictorService(PredictorConfig(**config), bucket=bucket)
        service.nc = nc
        await service.start()
        runner, port = await start_http(service, "127.0.0.1", 0)
        started.append((service, runner))
        return service, f"http://127.0.0.1:{port}"

    yield make
    for service, runner in started:
        await runner.cleanup()
        await service.stop()


def synthetic_verdicts(n: int, seed: int) -> list[VerdictEvent]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rows, num_accepted = synthetic_round(rng, noise=0.02)
        out.append(VerdictEvent(ts_ms=1.0, sid=f"s{i % 7}", round=i, device_id="edge0",
                                greedy=bool(i % 2), num_drafted=len(rows),
                                num_accepted=num_accepted, draft_features=rows))
    return out


def edge_round(i: int, version: str | None) -> RoundEvent:
    return RoundEvent(ts_ms=1.0, sid="s0", mode="wisp", round=i, drafted=3, accepted=2,
                      committed=3, draft_ms=3.0, wasted_draft_ms=1.0, rtt_ms=5.0,
                      budget_ms=50.0, batch_size=1, policy="predictor",
                      predictor_version=version)


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_service_retrains_publishes_and_a_follower_installs(
        nc: NatsClient, bucket: str, models: dict[str, bytes], tmp_path: Path,
        make_service) -> None:
    start_model = tmp_path / "bad.onnx"
    start_model.write_bytes(models["t-bad"])
    service, url = await make_service(
        predictor=str(start_model), retrain_every_rows=960, retrain_interval_s=0, min_rows=300,
        window_rows=200, drift_false_alarm=0.0, holdout_frac=0.3, epochs=40, seed=3)
    assert service.slot.version == "t-bad"
    edge_slot = PredictorSlot()
    assert edge_slot.install(models["t-bad"], "shipped-file")
    follower = PredictorFollower(nc, edge_slot, bucket)
    await follower.start()
    try:
        for i, ev in enumerate(synthetic_verdicts(120, seed=1)):  # 960 rows
            await publish_event(nc, ev)
            await publish_event(nc, edge_round(i, "t-bad" if i % 4 else None))
        await until(lambda: service.rows.seen == 960, "every verdict to arrive")
        bad_stats = service.stats.total.rates()
        assert service.stats.total.rows == 960
        # The bad model predicts "rejected" where tokens are accepted.
        assert bad_stats["false_alarm"] > 0.5

        await until(lambda: service.outcomes["accepted"] == 1, "a retrain to be accepted",
                    timeout_s=20)
        decision = service.history[-1]
        assert decision.reason == "rows" and decision.outcome == "accepted"
        assert decision.new_version == "live-1" and decision.published == 1
        assert decision.candidate_cost_ms < decision.current_cost_ms
        assert service.slot.version == "live-1"

        stored = await fetch_newest(nc, bucket)
        assert stored is not None and stored[0].model_version == "live-1"
        await until(lambda: edge_slot.version == "live-1", "the follower to install live-1")
        assert edge_slot.current.sha256 == stored[0].sha256

        # Live statistics of the new model, on fresh traffic.
        for ev in synthetic_verdicts(40, seed=2):
            await publish_event(nc, ev)
        await until(lambda: service.stats.total.rows == 320, "the new model to score rows")
        samples = await scrape(url)
        precision = samples[("wisp_predictor_live_precision", (("scope", "cumulative"),))]
        recall = samples[("wisp_predictor_live_recall", (("scope", "cumulative"),))]
        false_alarm = samples[("wisp_predictor_live_false_alarm", (("scope", "cumulative"),))]
        # The retrained model finds the rejections. Its false-alarm rate is the cost model's
        # call: a false alarm only ends a round early (the token is still sent), so a low
        # threshold may be the cheapest; the cost comparison above is what must hold.
        assert precision > 0.8 and recall > 0.8 and 0.0 <= false_alarm <= 1.0
        assert ("wisp_predictor_live_precision", (("scope", "window"),)) in samples
        assert samples[("wisp_predictor_version_info", (("version", "live-1"),))] == 1
        assert ("wisp_predictor_version_info", (("version", "t-bad"),)) not in samples
        assert samples[("wisp_predictor_retrains_total", (("outcome", "accepted"),))] == 1
        assert samples[("wisp_predictor_rows_total", ())] == 1280
        assert samples[("wisp_predictor_edge_rounds_total",
                        (("predictor_version", "t-bad"),))] == 90
        assert samples[("wisp_predictor_edge_rounds_total",
                        (("predictor_version", "none"),))] == 30

        async with aiohttp.ClientSession() as http, http.get(url + "/status") as resp:
            status = await resp.json()
        assert status["model"]["version"] == "live-1" and status["model"]["store_version"] == 1
        assert status["history"][-1]["outcome"] == "accepted"
        assert status["live"]["cumulative"]["precision"] == pytest.approx(precision)
        assert status["live"]["cumulative"]["false_alarm"] == pytest.approx(false_alarm)
    finally:
        await follower.stop()


async def test_bad_events_do_not_stop_the_service(nc: NatsClient, make_service) -> None:
    service, url = await make_service(predictor="", retrain_every_rows=0, retrain_interval_s=0,
                                      drift_false_alarm=0.0)
    good = synthetic_verdicts(2, seed=4)
    await publish_event(nc, good[0])
    await nc.publish(event_subject("verdict"), b"\xc1 not msgpack")
    raw = msgspec.msgpack.decode(encode(good[1]))
    raw["num_accepted"] = raw["num_drafted"] + 1  # more accepted than drafted
    await nc.publish(event_subject("verdict"), msgspec.msgpack.encode(raw))
    raw = msgspec.msgpack.decode(encode(good[1]))
    raw["draft_features"] = [[0.5, 0.5]]  # rows of the wrong width
    await nc.publish(event_subject("verdict"), msgspec.msgpack.encode(raw))
    await publish_event(nc, good[1])
    await until(lambda: service.events["verdict"] == 2, "the good verdicts after the bad")
    assert service.events["bad"] == 3
    assert service.rows.seen == 16
    samples = await scrape(url)
    assert samples[("wisp_predictor_bad_events_total", ())] == 3
    assert not any(name == "wisp_predictor_version_info" for name, _ in samples)  # no model
    assert service.ready()
