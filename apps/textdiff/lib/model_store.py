"""A trained model of the app, loaded once and reloaded when a training job publishes a new one.

Training runs in another process and replaces the model (`textdiff.pt`, or the CDM folder with its `cdm.json`)
atomically; every request compares that file's modification time, so the infer tasks, scoring and strategies use
new weights without a server restart.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from textdiff.model.segmenter import load_checkpoint

logger = logging.getLogger(__name__)


class ModelStore:
    def __init__(self, checkpoint: Path, device: str, load: Callable[[Path, str], Any] = load_checkpoint):
        """`checkpoint` is the file whose change means a new model; `load(checkpoint, device)` reads the model."""
        self.checkpoint = Path(checkpoint)
        self.device = device
        self._load = load
        self._lock = threading.Lock()
        self._model: Any = None
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

    def get(self) -> Any:
        """The current model; loads (or reloads) it when the checkpoint on disk has changed."""
        with self._lock:
            stamp = self.checkpoint.stat().st_mtime_ns if self.exists() else None
            if self._model is None or stamp != self._stamp:
                logger.info("loading the model from %s", self.checkpoint)
                self._model = self._load(self.checkpoint, self.device)
                self._stamp = stamp
            return self._model
