"""Inference off the event loop: a bounded pool of workers and a bounded queue in front of it.

MONAI Label's handlers are `async` and run the model inline, so one infer blocks every endpoint. Here an infer
waits for a worker in a thread, the server keeps answering (`/info`, uploads), and when the queue is full the
client is told to come back (503 with Retry-After) instead of waiting without end.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import HTTPException


class WorkQueue:
    def __init__(self, workers: int, depth: int, retry_after_s: int = 5):
        """`workers` run at once (one per device: the feature hooks of a model are not re-entrant); `depth` more
        may wait."""
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        self.slots = threading.BoundedSemaphore(workers + depth)
        self.retry_after_s = retry_after_s

    async def run(self, work: Callable[..., Any], *args) -> Any:
        if not self.slots.acquire(blocking=False):
            raise HTTPException(503, "the server is busy segmenting other images: try again shortly",
                                headers={"Retry-After": str(self.retry_after_s)})
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)
        finally:
            self.slots.release()
