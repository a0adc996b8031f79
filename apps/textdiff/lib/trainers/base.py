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
from abc import abstractmethod
from datetime import datetime
from pathlib import Path

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import name_to_device

from ..errors import client_errors

logger = logging.getLogger(__name__)


class StatsTrainTask(TrainTask):
    def __init__(self, description: str, config: dict, stats_path: Path, threads: int = 0):
        super().__init__(description)
        self._config = {"device": "cuda" if torch.cuda.is_available() else "cpu", **config}
        self.stats_path = Path(stats_path)
        self.threads = threads

    def config(self) -> dict:
        return self._config

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.is_file() else {}

    @abstractmethod
    def pre_process(self, request: dict, datastore: Datastore):
        """What to train on, read from the datastore; raise DataError when there is nothing."""

    @abstractmethod
    def train(self, request: dict, data) -> dict:
        """Train, publish the model atomically, and return the stats to keep."""

    def __call__(self, request, datastore: Datastore) -> dict:
        request = {**copy.deepcopy(self._config), **copy.deepcopy(request)}
        request["run_id"] = datetime.now().strftime("%Y%m%d_%H%M%S")
        request["device"] = name_to_device(request.get("device"))
        if self.threads:
            torch.set_num_threads(self.threads)
        logger.info("train request: %s", request)
        with client_errors():  # nothing to train on, bad params or data the run refuses: a 422 for a synchronous run
            data = self.pre_process(request, datastore)
            stats = self.train(request, data)
        stats = {"run_id": request["run_id"], **stats}
        tmp = self.stats_path.with_name(f".{self.stats_path.name}.tmp")
        tmp.write_text(json.dumps(stats, indent=1))
        tmp.replace(self.stats_path)
        return stats
