"""The whole stack as separate processes (the launcher behind `wisp up`) on real NATS and
Redis: exactness across modes and verifier replicas, failover, restarts, and bad input.

Every generation is greedy, so every output must equal the target's own greedy output.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch

from common import protocol as wire
from common.client import Client, ServerError
from common.errors import ErrorCode
from common.models.reference import hf_greedy
from common.store import SessionStore
from common.subjects import GENERATE_EDGE, SESSION_OPEN, VERIFY_SUBMIT
from services.stack.launcher import stack_options, start_stack, stop_stack
from tests.shipped import held_out_prompts, shipped_pair

pytestmark = pytest.mark.slow
MAX_NEW = 40


@pytest.fixture(scope="module")
def stack(nats_url, redis_url, tmp_path_factory):
    args = stack_options(
        nats_url=nats_url, redis_url=redis_url, verifiers=2, device="cpu", log_level="info",
        # Named as `wisp up` names it, so the README's example finds stack.json.
        state_dir=str(tmp_path_factory.mktemp("stack") / ".wisp"),
        # Short timeouts so failure tests recover in seconds, not the production defaults.
        extra_env={"WISP_VERIFY_TIMEOUT_S": "2", "WISP_HEARTBEAT_TIMEOUT_S": "1.5",
                   "WISP_HEARTBEAT_S": "0.3", "OMP_NUM_THREADS": "1",
                   # SLO-tight sessions on this CPU would be refused as overloaded; admission
                   # control has its own tests.
                   "WISP_ADMISSION": "off"})
    s = start_stack(args)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def cases():
    _, target = shipped_pair()
    prompts = held_out_prompts(target.tokenizer, per_domain=4, max_tokens=96)
    refs = [hf_greedy(target.model, p, MAX_NEW, target.eos_token_id) for p in prompts]
    return prompts, refs


async def generate_ids(client: Client, prompt_ids, mode: str, **kw) -> tuple[list[int], object]:
    gen = client.generate(None, prompt_ids=prompt_ids, max_new_tokens=MAX_NEW, mode=mode, **kw)
    ids: list[int] = []
    async for tok in gen:
        ids.extend(tok.token_ids)
    return ids, gen.done


@pytest.mark.parametrize("mode", ["sled", "wisp", "ucb", "centralized", "colocated"])
async def test_eight_concurrent_sessions_across_two_verifiers_are_exact(stack, cases, mode,
                                                                        redis_client):
    prompts, refs = cases
    async with Client(stack.nats_url, timeout_s=120) as client:
        results = await asyncio.gather(*(generate_ids(client, p, mode) for p in prompts))
    for i, ((ids, done), ref) in enumerate(zip(results, refs, strict=True)):
        assert ids == ref, f"{mode}: prompt {i} differs from the target's greedy output"
        assert done.num_tokens == len(ref)
    if mode != "centralized":
        assert sum(done.stats.accepted for _, done in results) > 0
    # Sessions spread over both replicas (routing by load).
    store = SessionStore(redis_client)
    verifiers = {(await store.load(done.sid)).verifier_id for _, done in results}
    assert verifiers == {"v0", "v1"}


async def _first_tokens_then(client, prompts, action, mode="sled", **kw):
    """Start all generations, run `action` once tokens flow, and collect every output.

    Asserts that the action struck while generations were still running."""
    started = asyncio.Event()
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(i, p):
        gen = client.generate(None, prompt_ids=p, max_new_tokens=MAX_NEW, mode=mode, **kw)
        async for tok in gen:
            outputs[i].extend(tok.token_ids)
            started.set()
        return outputs[i]

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
    await asyncio.wait_for(started.wait(), 60)
    # Still producing tokens (not merely waiting for its final message).
    unfinished = sum(not t.done() and len(out) < MAX_NEW for t, out in zip(tasks, outputs,
                                                                          strict=True))
    await asyncio.to_thread(action)
    assert unfinished > 0, "every generation finished before the failure: nothing was tested"
    return await asyncio.gather(*tasks)


def _predictor_variant(bias: float, version: str) -> bytes:
    """The shipped predictor with its output bias moved by `bias` (large: stops at every
    token), exported under another version."""
    from common.engine.predictor.model import export_onnx
    from common.engine.predictor.release import load_torch
    from common.models.loading import DEFAULT_PREDICTOR

    model = load_torch(Path(DEFAULT_PREDICTOR).with_name("predictor.pt"))
    with torch.no_grad():
        model.net[-1].bias += bias
    return export_onnx(model, {"version": version, "threshold": 0.5})


async def test_predictor_hot_swap_and_a_corrupt_model_mid_session_keep_output_exact(
        stack, cases, nc):
    """Mid-generation in mode wisp, the predictor service's store announces a new model
    (one that stops at every token), then a corrupt one: the edges swap between rounds,
    refuse the corrupt one with a warning, keep the last good, and every output stays the
    target's greedy output."""
    from common.subjects import PREDICTOR_BUCKET, event
    from common.transport.predictor_store import publish_model

    prompts, refs = cases
    eager = await asyncio.to_thread(_predictor_variant, 30.0, "test-always-stop")
    versions: dict[str, list[str | None]] = {}

    async def on_round(msg):
        ev = wire.decode(wire.RoundEvent, msg.data)
        versions.setdefault(ev.sid, []).append(ev.predictor_version)

    sub = await nc.subscribe(event("round"), cb=on_round)
    loop = asyncio.get_running_loop()

    def swap_then_corrupt():
        asyncio.run_coroutine_threadsafe(
            publish_model(nc, eager, "test-always-stop", 0.5), loop).result(30)
        asyncio.run_coroutine_threadsafe(
            publish_model(nc, b"\x08\x07 not an onnx model", "test-corrupt", 0.5),
            loop).result(30)

    try:
        async with Client(stack.nats_url, timeout_s=120) as client:
            outputs = await _first_tokens_then(client, prompts, swap_then_corrupt, mode="wisp")
        assert outputs == refs
        await asyncio.sleep(0.5)  # the last round events
        seen = {v for vs in versions.values() for v in vs}
        assert "test-always-stop" in seen, seen  # the swap landed mid-session
        assert "test-corrupt" not in seen
        # The edge reports the model it kept and the latency of its calls.
        edge = next(s for s in stack.services if s.name == "edge-drafter-0")
        async with aiohttp.ClientSession() as http, \
                http.get(f"{edge.url}/predictor") as resp:
            info = await resp.json()
        assert info["version"] == "test-always-stop", info
        assert info["latency_us"]["calls"] > 0 and info["latency_us"]["p50_us"] > 0
        # The swap is between rounds: once a session used the new model it never went back.
        for vs in versions.values():
            used = [v for v in vs if v is not None]  # None: an exploration round
            if "test-always-stop" in used:
                first = used.index("test-always-stop")
                assert set(used[first:]) == {"test-always-stop"}, used
    finally:
        await sub.unsubscribe()
        await nc.jetstream().delete_object_store(PREDICTOR_BUCKET)


@pytest.mark.parametrize("mode", ["sled", "wisp"])
async def test_killing_a_verifier_mid_generation_keeps_output_exact(stack, cases, nc, mode):
    """Mode wisp runs under the scheduler's `wisp` batch policy (the stack's policy is auto)
    with SLOs tight enough on this CPU that deadlines are missed and late rounds are served;
    sled under FCFS. Killing a verifier mid-generation changes no output token."""
    from common.subjects import event

    prompts, refs = cases
    policies: list[str] = []

    async def on_schedule(msg):
        policies.append(wire.decode(wire.ScheduleEvent, msg.data).policy)

    sub = await nc.subscribe(event("schedule"), cb=on_schedule)
    try:
        async with Client(stack.nats_url, timeout_s=120) as client:
            outputs = await _first_tokens_then(
                client, prompts, lambda: stack.kill("gpu-verifier-0", signal.SIGKILL),
                mode=mode, slo=(2000.0, 15.0))
        await asyncio.sleep(0.3)  # the last schedule events
    finally:
        await sub.unsubscribe()
        stack.restart("gpu-verifier-0")
    assert outputs == refs
    assert set(policies) == {"wisp" if mode == "wisp" else "fcfs"}, set(policies)


async def test_restarting_the_edge_drafter_loses_no_committed_token(stack, cases):
    prompts, refs = cases

    def crash_and_restart():
        stack.kill("edge-drafter-0", signal.SIGKILL)
        stack.restart("edge-drafter-0")

    async with Client(stack.nats_url, timeout_s=120, stall_timeout_s=3.0) as client:
        outputs = await _first_tokens_then(client, prompts[:4], crash_and_restart)
    assert outputs == refs[:4]


async def test_restarting_the_scheduler_loses_no_committed_token(stack, cases):
    prompts, refs = cases
    async with Client(stack.nats_url, timeout_s=120) as client:
        outputs = await _first_tokens_then(
            client, prompts[:4], lambda: stack.restart("admission-scheduler"))
    assert outputs == refs[:4]


async def test_bad_input_gets_clear_errors_while_others_continue(stack, cases, nc):
    prompts, refs = cases
    async with Client(stack.nats_url, timeout_s=120) as client:
        healthy = asyncio.create_task(generate_ids(client, prompts[0], "sled"))

        for subject in (GENERATE_EDGE, SESSION_OPEN, VERIFY_SUBMIT):
            reply = await nc.request(subject, b"\xc1\x00garbage", timeout=10)
            with pytest.raises(Exception) as err:
                wire.decode_reply(wire.SessionOpened, reply.data)
            assert getattr(err.value, "code", None) == ErrorCode.BAD_REQUEST, subject

        unknown = wire.VerifyRequest(sid="0" * 32, round=0, base_len=3, draft_ids=[1],
                                     budget_ms=1000.0, draft_ms=0.0, device_id="test")
        reply = await nc.request(VERIFY_SUBMIT, wire.encode(unknown), timeout=10)
        with pytest.raises(Exception) as err:
            wire.decode_reply(wire.VerifyResult, reply.data)
        assert err.value.code == ErrorCode.UNKNOWN_SESSION

        _, target = shipped_pair()
        with pytest.raises(ServerError) as err:
            await generate_ids(client, [1, 2, target.vocab_size + 7], "sled")
        assert err.value.code == ErrorCode.OUT_OF_VOCABULARY

        with pytest.raises(ServerError) as err:
            await generate_ids(client, [5] * 5000, "sled")
        assert err.value.code == ErrorCode.PROMPT_TOO_LONG

        # A prompt that fits but cannot grow by max_new_tokens in the target's context: refused
        # at open, before any round, for an edge mode and a server-side mode alike.
        for mode in ("wisp", "centralized"):
            gen = client.generate(None, prompt_ids=prompts[2], max_new_tokens=2040, mode=mode)
            with pytest.raises(ServerError) as err:
                async for _ in gen:
                    pass
            assert err.value.code == ErrorCode.SEQUENCE_TOO_LONG, mode
            assert "context" in err.value.message

        # A draft longer than k_max, sent for a real session.
        spec = wire.SessionSpec(sid=wire.new_sid(), mode="sled", max_new_tokens=8,
                                device_id="test", k_max=8)
        opened = wire.decode_reply(wire.SessionOpened, (await nc.request(SESSION_OPEN, wire.encode(
            wire.SessionOpen(spec=spec, prompt_ids=prompts[1], vocab=target.vocab_info)),
            timeout=10)).data)
        too_long = wire.VerifyRequest(sid=opened.sid, round=0, base_len=len(prompts[1]),
                                      draft_ids=[1] * 12, budget_ms=1000.0, draft_ms=0.0,
                                      device_id="test")
        reply = await nc.request(VERIFY_SUBMIT, wire.encode(too_long), timeout=10)
        with pytest.raises(Exception) as err:
            wire.decode_reply(wire.VerifyResult, reply.data)
        assert err.value.code == ErrorCode.DRAFT_TOO_LONG

        ids, _ = await healthy
    assert ids == refs[0]


async def test_degenerate_sampling_values_leave_concurrent_sessions_exact(stack, cases):
    """Requests at the edges of the sampling ranges, sent while greedy sessions generate: the
    greedy ones stay exact, and the degenerate ones work exactly too (each of these settings
    makes the target's distribution its argmax, so they equal the greedy output)."""
    prompts, refs = cases
    degenerate = [dict(temperature=1.0, top_p=1e-300), dict(temperature=1e-300),
                  dict(temperature=5e-324, top_p=1e-300), dict(temperature=1e300, top_k=1)]
    async with Client(stack.nats_url, timeout_s=120) as client:
        results = await asyncio.gather(
            *(generate_ids(client, p, "sled") for p in prompts[:4]),
            *(generate_ids(client, p, mode, seed=i, **params)
              for i, (p, params, mode) in enumerate(zip(
                  prompts[4:], degenerate, ["sled", "sled", "colocated", "sled"], strict=True))))
    assert [ids for ids, _ in results] == refs
    assert all(done.finish_reason != "error" for _, done in results)


def test_the_readme_sdk_example_runs_against_the_stack(stack):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Client SDK"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], cwd=stack.state_dir.parent, timeout=120,
                         capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=repo))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GenerateTimings" in out.stdout and len(out.stdout) > 60
