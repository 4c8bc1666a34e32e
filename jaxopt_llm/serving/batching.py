"""Adaptive micro-batching: concurrent requests are queued and run together in one worker thread (the model
call releases the GIL). A batch takes what is queued when the worker is free, up to `max_batch` items; it waits
(at most `max_wait` seconds after its first request) for more only when it already holds several requests, so
a lone request never pays a batching delay, and under load the requests that arrive while a batch runs form
the next one.

Isolation: a batch whose model call fails is run again one request at a time, so only the request that
fails gets the error; every other request gets the answer it would have had alone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class MicroBatcher:
    def __init__(self, predict: Callable[[list[str]], Any], max_batch: int = 32, max_wait: float = 0.005,
                 on_batch: Callable[[int, float], None] | None = None):
        self.predict, self.max_batch, self.max_wait, self.on_batch = predict, max_batch, max_wait, on_batch
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish what is queued, then stop (graceful shutdown)."""
        if self.queue is not None:
            await self.queue.join()
        if self.worker is not None:
            self.worker.cancel()

    async def submit(self, texts: list[str]) -> Any:
        """The model's outputs for `texts` (as `predict` returns them, one row per text)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items, count = [first], len(first[0])
            while count < self.max_batch and not self.queue.empty():  # what is queued now: no wait
                item = self.queue.get_nowait()
                items.append(item)
                count += len(item[0])
            deadline = loop.time() + self.max_wait
            while len(items) > 1 and count < self.max_batch:  # under load: a short wait to fill the batch
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                items.append(item)
                count += len(item[0])
            texts = [t for item, _ in items for t in item]
            start = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(None, self.predict, texts)
            except Exception as err:  # the batch failed: each request alone, so only the culprit fails
                if len(items) == 1:
                    if not items[0][1].done():
                        items[0][1].set_exception(err)
                else:
                    for texts_i, future in items:
                        try:
                            alone = await loop.run_in_executor(None, self.predict, list(texts_i))
                        except Exception as err_i:
                            if not future.done():
                                future.set_exception(err_i)
                        else:
                            if not future.done():
                                future.set_result(alone)
            else:
                if self.on_batch is not None:
                    self.on_batch(len(texts), time.perf_counter() - start)
                offset = 0
                for texts_i, future in items:
                    n = len(texts_i)
                    if not future.done():
                        future.set_result(tuple(o[offset:offset + n] for o in outputs))
                    offset += n
            finally:
                for _ in items:
                    self.queue.task_done()
