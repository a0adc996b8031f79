"""What the app's two train tasks share: MONAI Label's request handling (config defaults, run id, device) and
train stats in the model folder.

They implement MONAI Label's TrainTask interface (what its /train endpoints, Slicer's and OHIF's Train buttons and
/info use) rather than BasicTrainTask: BasicTrainTask drives an Ignite loop over raw images, which would recompute
the frozen diffusion features every iteration; the library's loops train on cached features.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from abc import abstractmethod
from datetime import datetime
from pathlib import Path

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device
from textdiff.config import CHECKPOINT_CHOICES, VOLUME_SLICES
from textdiff.errors import DataError

from ..configs.params import MAX_TEXT_CHARS, parse_value
from ..errors import client_errors

logger = logging.getLogger(__name__)


class StatsTrainTask(TrainTask):
    def __init__(self, description: str, config: dict, stats_path: Path):
        super().__init__(description)
        self._config = {"device": "cuda" if torch.cuda.is_available() else "cpu", **config}
        self.stats_path = Path(stats_path)

    def config(self) -> dict:
        return self._config

    def check_params(self, params: object) -> dict:
        """Train params as a client sends them, checked in the server process before any job starts: known names,
        values of the config's types within sane bounds (DataError otherwise, a 422)."""
        if not isinstance(params, dict):
            raise DataError(f"train params must be a JSON object, got {type(params).__name__}")
        unknown = sorted(set(params) - set(self._config) - CLIENT_KEYS)
        if unknown:
            raise DataError(f"unknown train params {unknown}: this task takes {sorted(self._config)}")
        return {name: _checked(name, value, self._config[name]) for name, value in params.items()
                if name in self._config}

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.is_file() else {}

    @abstractmethod
    def pre_process(self, request: dict, datastore: Datastore):
        """What to train on, read from the datastore; raise DataError when there is nothing."""

    @abstractmethod
    def train(self, request: dict, data) -> dict:
        """Train, publish the model atomically, and return the stats to keep."""

    def __call__(self, request, datastore: Datastore) -> dict:
        """One run: the request's params read again by `check_params` (a job gets them as JSON), so that `train`
        reads every param at its config type; other keys (the model's name) pass through."""
        with client_errors():
            params = self.check_params({k: v for k, v in request.items() if k in self._config})
        request = {**copy.deepcopy(self._config), **copy.deepcopy(request), **params}
        request["run_id"] = datetime.now().strftime("%Y%m%d_%H%M%S")
        request["device"] = name_to_device(request.get("device"))
        logger.info("train request: %s", request)
        with client_errors():  # nothing to train on, bad params or data the run refuses: a 422 for a synchronous run
            data = self.pre_process(request, datastore)
            stats = self.train(request, data)
        stats = {"run_id": request["run_id"], **stats}
        tmp = self.stats_path.with_name(f".{self.stats_path.name}.tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(self.stats_path)
        return stats


# What MONAI Label clients (3D Slicer, OHIF) add to every train request; accepted and not used.
CLIENT_KEYS = {"client_id", "model", "name", "pretrained", "val_batch_size", "multi_gpu", "gpus"}
# Bounds of numeric train params: (smallest, largest); others are numbers >= 0.
BOUNDS = {"max_epochs": (0, 100_000), "max_steps": (1, 1_000_000), "max_minutes": (0.01, 100_000), "train_batch_size": (1, 4096), "val_split": (0.0, 0.9),
          "learning_rate": (1e-9, 10.0), "embedding_learning_rate": (1e-9, 10.0), "intensity_copies": (0, 16)}
# Text params that take one of a few values.
CHOICES = {"volume_slices": VOLUME_SLICES, "checkpoint": CHECKPOINT_CHOICES}


def _checked(name: str, value: object, default: object) -> object:
    """`value` as the type of `default` (`params.parse_value`), or DataError naming the param."""
    if name == "device":
        return _device(value)
    if isinstance(default, str) and isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise DataError(f"train param {name} must be text of at most {MAX_TEXT_CHARS} characters")
    return parse_value(value, default, f"train param {name}", BOUNDS.get(name, (0, math.inf)), CHOICES.get(name))


def _device(value: object) -> str:
    """cpu, or a CUDA device this machine has."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    known = ["cpu", *(["cuda"] if gpus else []), *gpus]
    if value not in known:
        raise DataError(f"train param device must be one of {known}, got {value!r}")
    return value
