"""The app's trained model, loaded once and reloaded when a training job publishes a new checkpoint.

Training runs in another process and replaces `textdiff.pt` atomically; every request compares the file's
modification time, so the infer task, scoring and strategies use new weights without a server restart.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from textdiff.model import TextDiffModel, load_checkpoint

logger = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, checkpoint: Path, device: str):
        self.checkpoint = Path(checkpoint)
        self.device = device
        self._lock = threading.Lock()
        self._model: TextDiffModel | None = None
        self._stamp: float | None = None

    def exists(self) -> bool:
        return self.checkpoint.is_file()

    @property
    def version(self) -> int | None:
        """Modification time (ns) of the loaded checkpoint."""
        return self._stamp

    def version_on_disk(self) -> int | None:
        """Modification time (ns) of the checkpoint a new load would read."""
        return self.checkpoint.stat().st_mtime_ns if self.exists() else None

    def get(self) -> TextDiffModel:
        """The current model; loads (or reloads) it when the checkpoint on disk has changed."""
        with self._lock:
            stamp = self.checkpoint.stat().st_mtime_ns if self.exists() else None
            if self._model is None or stamp != self._stamp:
                logger.info("loading TextDiff model from %s", self.checkpoint)
                self._model = load_checkpoint(self.checkpoint, self.device)
                self._stamp = stamp
            return self._model
