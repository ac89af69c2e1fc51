"""Drive a workload through the real SDK against a running stack, recording client-side times.

Two arrival disciplines share the per-request code:

* **open loop** (:func:`open_loop`, the default): each request is sent at its arrival offset; a
  late request does not delay the next, so an overloaded server sees the load the trace offers;
* **closed loop** (:func:`closed_loop`, ``concurrency=N``): N clients each send the workload's
  next request as soon as their previous one finished, ignoring the timestamps; the load adapts
  to the server (a sweep's concurrency axis).

Requests go through `common.client.Client`, exactly as an application sends them; the record
holds the client's own timestamps (sent, first token, done) next to what the server reported,
so the report's TTFT/TPOT can be checked against both. A bounded error budget stops the run
early when too many requests fail (a broken stack should not take the whole replay to say so),
and a :class:`~loadgen.progress.ProgressDisplay` shows the run while it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats

from common.client import Client, WispClientError
from common.errors import ErrorCode
from common.protocol import RoundEvent, decode
from common.subjects import event
from loadgen.progress import Progress, ProgressDisplay
from loadgen.report import RequestRecord
from loadgen.workload import PromptBuilder, RequestSpec, SloClass, slo_for

__all__ = ["ReplayConfig", "ReplayOutcome", "closed_loop", "open_loop", "replay"]

Send = Callable[[int], Awaitable[None]]  # sends request i of the workload and waits for its end


@dataclass(slots=True)
class ReplayConfig:
    mode: str
    slo_classes: dict[str, SloClass]
    default_slo_class: str | None = None  # for requests that name none (None: no SLO)
    request_timeout_s: float = 300.0
    max_error_rate: float = 0.5  # stop sending once more than this share of done ones failed...
    min_errors: int = 10  # ...and at least this many failed (a couple of failures never stop it)


@dataclass(slots=True)
class ReplayOutcome:
    records: list[RequestRecord]
    duration_s: float  # first send to last completion
    stopped_early: str | None = None  # why the error budget stopped it
    round_events: list[RoundEvent] = field(default_factory=list, repr=False)  # of its mode


async def open_loop(specs: list[RequestSpec], send: Send, stop: asyncio.Event,
                    start: float) -> None:
    """Send request i at `start` + its arrival offset (``time.perf_counter`` clock), whether or
    not earlier ones finished; none is sent once `stop` is set."""
    async def at_arrival(i: int, spec: RequestSpec) -> None:
        delay = start + spec.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if not stop.is_set():
            await send(i)

    await asyncio.gather(*(at_arrival(i, s) for i, s in enumerate(specs)))


async def closed_loop(num_requests: int, clients: int, send: Send, stop: asyncio.Event) -> None:
    """`clients` senders share the workload in order: each takes the next unsent request as soon
    as its previous one finished, so at most `clients` are in flight and the trace's timestamps
    play no part; none is taken once `stop` is set."""
    if clients < 1:
        raise ValueError(f"concurrency must be >= 1, got {clients}")
    # One iterator for all: the event loop runs one client at a time between awaits, so each
    # index goes to exactly one client.
    indices = iter(range(num_requests))

    async def client() -> None:
        for i in indices:
            if stop.is_set():
                return
            await send(i)

    await asyncio.gather(*(client() for _ in range(min(clients, num_requests))))


async def replay(nats_url: str, specs: list[RequestSpec], prompts: PromptBuilder,
                 config: ReplayConfig, *, capped: set[int] | None = None,
                 concurrency: int | None = None, say: Callable[[str], None] | None = None,
                 display: ProgressDisplay | None = None) -> ReplayOutcome:
    """Send every request of `specs` (open loop, or closed with `concurrency` clients) and wait
    for all of them. `say` gets the closing lines (default: stderr); `display` (None: none)
    shows the progress while it runs."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    capped = capped or set()
    records = [RequestRecord(index=s.index, mode=config.mode, sent_s=0.0, first_token_s=None,
                             done_s=None, prompt_tokens=s.prompt_tokens,
                             capped=s.index in capped, device=s.device) for s in specs]
    prompt_ids = [prompts.ids_for(s) for s in specs]  # built before the clock starts
    state = Progress(len(specs))
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
        async def send(i: int) -> None:
            spec, rec = specs[i], records[i]
            slo = slo_for(spec, config.slo_classes, config.default_slo_class)
            if slo is not None:
                rec.ttft_slo_ms, rec.tpot_slo_ms = slo.ttft_ms, slo.tpot_ms
            state.sent += 1
            await _run_one(client, rec, prompt_ids[i], spec, config,
                           None if slo is None else (slo.ttft_ms, slo.tpot_ms))
            state.done += 1
            state.failed += not rec.ok
            state.refused += rec.error_code == ErrorCode.OVERLOADED
            if (state.failed >= config.min_errors
                    and state.failed > config.max_error_rate * state.done):
                stop.set()

        start = time.perf_counter()
        span = None if concurrency else (specs[-1].arrival_s if specs else 0.0)
        reporter = asyncio.create_task(display.run(state, start, span)) if display else None
        try:
            if concurrency:
                await closed_loop(len(specs), concurrency, send, stop)
            else:
                await open_loop(specs, send, stop, start)
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                display.close()
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
