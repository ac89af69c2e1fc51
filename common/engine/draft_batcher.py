"""A `DraftPort` for asyncio drivers: shares each draft forward pass among the sessions of one
process that draft at once, and keeps model work off the event loop.

Every call on the drafter core runs on one dedicated worker thread (the core is not thread
safe). Sessions that ask for a draft while a batch is running join the next batch, so under
load batches grow by themselves.
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
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await asyncio.sleep(0)  # let sessions that became ready together join this batch
            batch, self._waiting = self._waiting, {}
            if not batch:
                continue
            try:
                drafts = await self.call(self.core.draft, list(batch))
            except Exception as exc:  # noqa: BLE001 - each waiter gets the failure
                for future in batch.values():
                    if not future.done():
                        future.set_exception(exc)
                continue
            for sid, future in batch.items():
                if not future.done():
                    future.set_result(drafts[sid])

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
