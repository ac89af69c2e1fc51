"""A `DraftPort` for asyncio drivers: shares each draft forward pass among the sessions of one
process that draft at once, and keeps model work off the event loop.

Every call on the drafter core runs on one dedicated worker thread (the core is not thread
safe). Batching is continuous, step by step: a session that asks for a draft while others are
drafting joins them at the next draft step (it waits one step, not their whole round), so
under load batches grow by themselves and no session waits behind another's long draft.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.engine.drafter import Draft, DrafterCore
from common.engine.policies import DraftPolicy
from common.protocol import SessionSpec

__all__ = ["DraftBatcher"]


class DraftBatcher:
    def __init__(self, core: DrafterCore):
        self.core = core
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self._waiting: dict[str, asyncio.Future[Draft]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def call(self, fn, *args, **kwargs):
        """Run a core method on the drafter thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def open(self, spec: SessionSpec, prompt_ids: list[int], policy: DraftPolicy,
                   committed_output: list[int] | None = None) -> None:
        await self.call(self.core.open, spec, prompt_ids, policy, committed_output)

    async def close(self, sid: str) -> None:
        await self.call(self.core.close, sid)

    async def apply(self, sid: str, num_accepted: int, new_tokens: list[int],
                    round_trip_s: float | None) -> None:
        await self.call(self.core.apply, sid, num_accepted, new_tokens, round_trip_s)

    async def resync(self, sid: str, committed: list[int]) -> None:
        await self.call(self.core.resync, sid, committed)

    async def draft(self, sid: str) -> Draft:
        if sid in self._waiting:
            raise RuntimeError(f"session {sid} already waits for a draft")
        future: asyncio.Future[Draft] = asyncio.get_running_loop().create_future()
        self._waiting[sid] = future
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="draft-batcher")
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        in_flight: dict[str, asyncio.Future[Draft]] = {}
        while True:
            if not in_flight:
                await self._wakeup.wait()
                self._wakeup.clear()
                await asyncio.sleep(0)  # let sessions that became ready together start together
            joining, self._waiting = self._waiting, {}
            in_flight.update(joining)
            if not in_flight:
                continue
            try:
                done, failed = await self.call(self._step, list(joining))
            except Exception as exc:  # noqa: BLE001 - every draft of the step gets the failure
                done, failed = {}, dict.fromkeys(in_flight, exc)
            for sid, result in [*done.items(), *failed.items()]:
                future = in_flight.pop(sid, None)
                if future is None or future.done():
                    continue
                if sid in failed:
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _step(self, joining: list[str]) -> tuple[dict[str, Draft], dict[str, Exception]]:
        """On the drafter thread: start the joining sessions' drafts, then one step for all.
        Returns (finished drafts, joining sessions that could not start and why)."""
        done: dict[str, Draft] = {}
        failed: dict[str, Exception] = {}
        try:
            done.update(self.core.begin(joining) if joining else {})
        except Exception:  # noqa: BLE001 - one bad session must not fail the others
            for sid in joining:
                try:
                    done.update(self.core.begin([sid]))
                except Exception as exc:  # noqa: BLE001 - reported to that session's waiter
                    failed[sid] = exc
        if self.core.drafting:
            done.update(self.core.step())
        return done, failed

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
