"""Adaptive batching: the images of concurrent requests go through ONNX Runtime in one call.

One model call at a time runs on its own thread (ONNX Runtime spreads it over the cores), so the
event loop stays free. While it runs, the requests that arrive queue up, and the next call takes
them all, up to `max_batch` images: under load the batches grow by themselves, and a lone request
finds the model idle and runs at once. A batch also waits, up to `max_wait_ms`, for requests that
are being decoded at that moment, since they will be ready within a decode's time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines.api.settings import Batching


@dataclass
class Pending:
    pixels: np.ndarray
    answer: asyncio.Future[np.ndarray]


class Batcher:
    """`await batcher.submit(pixels)` -> the model's output for those pixels, computed in a batch
    with whatever else is waiting; wrap a request's decoding in `batcher.decoding()` so that a
    batch being gathered can wait for it."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], policy: Batching,
                 on_batch: Callable[[int], None] = lambda images: None) -> None:
        self.run, self.policy, self.on_batch = run, policy, on_batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.queue: asyncio.Queue[Pending] | None = None
        self.held: Pending | None = None  # a request that did not fit the last batch: it opens the next
        self.in_decoding = 0
        self.changed: asyncio.Event | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Called on the event loop the requests are served on (the app's startup)."""
        self.queue, self.changed = asyncio.Queue(), asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.serve_batches(), name="batcher")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def decoding(self) -> AsyncIterator[None]:
        self.in_decoding += 1
        try:
            yield
        finally:
            self.in_decoding -= 1
            self.notify()

    def notify(self) -> None:
        if self.changed is not None:
            self.changed.set()

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        if self.queue is None:
            raise RuntimeError("the batcher was not started (Batcher.start on the serving event loop)")
        answer: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(pixels, answer))
        self.notify()
        return await answer

    async def serve_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.gather()
            images = sum(len(item.pixels) for item in batch)
            self.on_batch(images)
            try:
                output = await loop.run_in_executor(self.executor, self.run, np.concatenate([i.pixels for i in batch]))
            except Exception as err:  # noqa: BLE001 - every waiting request gets the model's error
                for item in batch:
                    if not item.answer.done():
                        item.answer.set_exception(err)
                continue
            start = 0
            for item in batch:
                if not item.answer.done():  # a client that went away leaves a cancelled future
                    item.answer.set_result(output[start:start + len(item.pixels)])
                start += len(item.pixels)

    async def gather(self) -> list[Pending]:
        """The next batch: what is queued, up to max_batch images, after waiting up to max_wait_ms
        for requests still being decoded."""
        assert self.queue is not None and self.changed is not None
        first, self.held = self.held or await self.queue.get(), None
        batch, images = [first], len(first.pixels)
        deadline = asyncio.get_running_loop().time() + self.policy.max_wait_ms / 1000
        while images < self.policy.max_batch:
            if self.queue.empty():
                left = deadline - asyncio.get_running_loop().time()
                if self.in_decoding == 0 or left <= 0:
                    break
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), left)
                continue
            item = self.queue.get_nowait()
            if images + len(item.pixels) > self.policy.max_batch:
                self.held = item
                break
            batch.append(item)
            images += len(item.pixels)
        return batch
