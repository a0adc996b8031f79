"""Progress in the log for work a server user waits on without a progress bar (a volume segmented slice by slice)."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class VolumeProgress:
    """A line in the log every `every` seconds while a volume is segmented: slices done, blank ones, time left."""

    def __init__(self, slices: int, every: float = 10.0):
        self.slices, self.every, self.done, self.blank = slices, every, 0, 0
        self.start = self.last = time.perf_counter()

    def step(self, blank: bool) -> None:
        self.done += 1
        self.blank += blank
        now = time.perf_counter()
        if self.slices > 1 and (now - self.last >= self.every or self.done == self.slices):
            self.last = now
            left = (now - self.start) / self.done * (self.slices - self.done)
            logger.info("segmented %d/%d slices (%d blank, skipped) in %.0f s, about %.0f s left",
                        self.done, self.slices, self.blank, now - self.start, left)
