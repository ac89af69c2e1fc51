"""Share each draft forward pass among the sessions of one process that draft at once.

Every call on the drafter core runs on one dedicated worker thread (the core is not thread
safe, and model work must stay off the event loop). Sessions that ask for a draft while a
batch is running join the next batch, so under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from services.edge_drafter.core import Draft, DrafterCore


class DraftBatcher:
    def __init__(self, core: DrafterCore):
        self.core = core
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")
        self._waiting: dict[str, asyncio.Future[Draft]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def call(self, fn, *args, **kwargs):
        """Run any other core method (open, apply, close) on the drafter thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

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

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
