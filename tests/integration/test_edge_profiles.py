"""The edge-drafter with a device-profiles file (WISP_DEVICE_PROFILES), on real NATS and Redis
with the shipped draft model: a request naming the file's profile is served with that
profile's link, one naming an unknown profile is a BAD_REQUEST. The scheduler and verifier are
fakes written here: they accept every draft at once."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NatsClient

from common.client import Client, ServerError
from common.config import load_config
from common.errors import ErrorCode
from common.protocol import SessionOpen, SessionOpened, VerifyRequest, VerifyResult, decode, encode
from common.subjects import SESSION_OPEN, VERIFY_SUBMIT
from common.transport.service import run_service
from services.edge_drafter.service import EdgeConfig, EdgeDrafterService

RTT_S = 0.2  # the file's profile: every round waits this long on the emulated link


async def fake_scheduler(nc: NatsClient, arrivals: list[float]) -> None:
    """Opens every session and accepts every draft, recording when each round arrives."""
    loop = asyncio.get_running_loop()

    async def on_open(msg) -> None:
        spec = decode(SessionOpen, msg.data).spec
        await msg.respond(encode(SessionOpened(sid=spec.sid, verifier_id="v0",
                                               committed_len=0)))

    async def on_verify(msg) -> None:
        arrivals.append(loop.time())
        req = decode(VerifyRequest, msg.data)
        new = [*req.draft_ids, 7]
        await msg.respond(encode(VerifyResult(
            sid=req.sid, round=req.round, num_drafted=len(req.draft_ids),
            num_accepted=len(req.draft_ids), new_tokens=new,
            committed_len=req.base_len + len(new), finished=False)))

    await nc.subscribe(SESSION_OPEN, cb=on_open)
    await nc.subscribe(VERIFY_SUBMIT, cb=on_verify)


async def test_a_profiles_file_s_profile_is_served_and_an_unknown_one_refused(
        nats_url, redis_url, nc, tmp_path, monkeypatch):
    path = tmp_path / "lab.toml"  # a loadgen fleets file: the edge reads its profiles only
    path.write_text(f"[profiles.lab-phone]\nrtt_ms = {RTT_S * 1e3}\ndraft_ms_per_token = 5\n"
                    '[fleets.lab]\nprofiles = { "lab-phone" = 1 }\n')
    monkeypatch.setenv("WISP_DEVICE_PROFILES", str(path))
    config = load_config(EdgeConfig, [
        "--nats-url", nats_url, "--redis-url", redis_url, "--device", "cpu", "--predictor", "",
        "--follow-predictor", "false", "--drain-timeout-s", "5"])
    assert config.device_profiles == str(path)
    arrivals: list[float] = []
    await fake_scheduler(nc, arrivals)
    service, stop = EdgeDrafterService(config), asyncio.Event()
    task = asyncio.create_task(run_service(service, config, stop))
    try:
        async with asyncio.timeout(60):
            while not service.ready():
                assert not task.done(), task.exception()
                await asyncio.sleep(0.05)
        async with Client(nats_url, timeout_s=30) as client:
            out = await client.generate_text(prompt_ids=[5, 6, 7, 8], max_new_tokens=12,
                                             mode="sled", k_max=2, device_profile="lab-phone")
            assert len(out.token_ids) == 12 and out.done.error is None
            # Rounds follow one another no faster than the profile's round trip.
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            assert len(gaps) >= 2 and min(gaps) >= RTT_S * 0.95, gaps
            with pytest.raises(ServerError) as info:
                await client.generate_text(prompt_ids=[5, 6], max_new_tokens=4, mode="sled",
                                           device_profile="carrier-pigeon")
            assert info.value.code == ErrorCode.BAD_REQUEST
            assert "carrier-pigeon" in str(info.value) and "lab-phone" in str(info.value)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
