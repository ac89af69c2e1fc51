"""Drive a workload through the real SDK against a running stack, recording client-side times.

Each request is sent at its arrival offset (open loop: a late request does not delay the next),
through `common.client.Client`, exactly as an application would; the record holds the client's
own timestamps (sent, first token, done) next to what the server reported, so the report's
TTFT/TPOT can be checked against both. A bounded error budget stops the run early when too many
requests fail (a broken stack should not take the whole replay to say so), and a progress line
goes to stderr while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats

from common.client import Client, WispClientError
from common.protocol import RoundEvent, decode
from common.subjects import event
from loadgen.report import RequestRecord
from loadgen.workload import PromptBuilder, RequestSpec, SloClass, slo_for

__all__ = ["ReplayConfig", "ReplayOutcome", "replay"]


@dataclass(slots=True)
class ReplayConfig:
    mode: str
    slo_classes: dict[str, SloClass]
    default_slo_class: str | None = None  # for requests that name none (None: no SLO)
    request_timeout_s: float = 300.0
    max_error_rate: float = 0.5  # stop sending once more than this share of done ones failed...
    min_errors: int = 10  # ...and at least this many failed (a couple of failures never stop it)
    progress_every_s: float = 2.0


@dataclass(slots=True)
class ReplayOutcome:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion
    stopped_early: str | None = None  # why the error budget stopped it
    round_events: list[RoundEvent] = field(default_factory=list, repr=False)  # of its mode


async def replay(nats_url: str, specs: list[RequestSpec], prompts: PromptBuilder,
                 config: ReplayConfig, *, capped: set[int] | None = None,
                 say: Callable[[str], None] | None = None) -> ReplayOutcome:
    """Send every request of `specs` at its arrival offset and wait for all of them."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    capped = capped or set()
    records = [RequestRecord(index=s.index, mode=config.mode, sent_s=0.0, first_token_s=None,
                             done_s=None, prompt_tokens=s.prompt_tokens,
                             capped=s.index in capped, device=s.device) for s in specs]
    prompt_ids = [prompts.ids_for(s) for s in specs]  # built before the clock starts
    state = _Progress(len(specs))
    stop = asyncio.Event()

    round_events: list[RoundEvent] = []
    events = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=3)

    async def on_round(msg) -> None:
        with contextlib.suppress(ValueError):  # another build's event: not ours to judge
            ev = decode(RoundEvent, msg.data)
            if ev.mode == config.mode:
                round_events.append(ev)

    await events.subscribe(event("round"), cb=on_round)
    async with Client(nats_url, timeout_s=config.request_timeout_s) as client:
        start = time.perf_counter()

        async def one(i: int, spec: RequestSpec) -> None:
            delay = start + spec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop.is_set():
                return
            slo = slo_for(spec, config.slo_classes, config.default_slo_class)
            rec = records[i]
            if slo is not None:
                rec.ttft_slo_ms, rec.tpot_slo_ms = slo.ttft_ms, slo.tpot_ms
            state.sent += 1
            await _run_one(client, rec, prompt_ids[i], spec, config,
                           None if slo is None else (slo.ttft_ms, slo.tpot_ms))
            state.done += 1
            state.failed += not rec.ok
            if (state.failed >= config.min_errors
                    and state.failed > config.max_error_rate * state.done):
                stop.set()

        reporter = asyncio.create_task(_report(state, say, config.progress_every_s, start))
        try:
            await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
        finally:
            reporter.cancel()
        end = max((r.done_s for r in records if r.done_s is not None), default=start)
    await events.drain()
    sent = [r for r in records if r.sent_s > 0]
    say(f"[loadgen] {config.mode}: {state.sent}/{len(specs)} sent, {state.done - state.failed} "
        f"completed, {state.failed} failed in {end - start:.1f} s")
    why = None
    if stop.is_set():
        why = (f"error budget: {state.failed} of {state.done} requests failed "
               f"(> {config.max_error_rate:.0%}); the rest were not sent")
        say(f"[loadgen] stopped early: {why}")
    return ReplayOutcome(sent, end - start, why, round_events)


async def _run_one(client: Client, rec: RequestRecord, prompt_ids: list[int], spec: RequestSpec,
                   config: ReplayConfig, slo: tuple[float, float] | None) -> None:
    rec.sent_s = time.perf_counter()  # the request goes out on the first iteration
    try:
        gen = client.generate(None, prompt_ids=prompt_ids, max_new_tokens=spec.output_tokens,
                              mode=config.mode, slo=slo, device_profile=spec.device)
        async for token in gen:
            if token.token_ids:
                if rec.first_token_s is None:
                    rec.first_token_s = time.perf_counter()
                rec.num_tokens += len(token.token_ids)
        rec.done_s = time.perf_counter()
        done = gen.done
        rec.ok = done is not None and done.finish_reason != "error"
        if done is not None:
            rec.sid = done.sid
            rec.server_ttft_ms = done.timings.ttft_ms
            rec.server_tpot_ms = done.timings.tpot_ms
            if done.error is not None:
                rec.error_code = str(done.error.code)
    except WispClientError as err:
        rec.done_s = time.perf_counter()
        rec.error_code = str(getattr(err, "code", None) or type(err).__name__)
    except ValueError as err:  # the SDK refused the arguments (a bad workload row)
        rec.done_s = time.perf_counter()
        rec.error_code = f"bad_request: {err}"


@dataclass(slots=True)
class _Progress:
    total: int
    sent: int = 0
    done: int = 0
    failed: int = 0


async def _report(state: _Progress, say: Callable[[str], None], every_s: float,
                  start: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        say(f"[loadgen] {time.perf_counter() - start:6.1f} s  sent {state.sent}/{state.total}  "
            f"done {state.done}  failed {state.failed}")
