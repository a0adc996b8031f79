"""The `cdm` train task: the class-conditional diffusion model learns from image-level labels only (no masks).

The labels are the datastore's image labels (reports.csv `label`, or `image_label` set through the image info), else
read from the reports. It starts from the current diffusion backbone when there is one (the class embedding at zero,
so it begins as that denoiser), and publishes model/cdm/ atomically; the `cdm` infer task picks it up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from textdiff.weak.cdm import CONFIG_FILE, train_cdm
from textdiff.config import BackboneConfig, CDMConfig
from textdiff.data.studies import Case, read_studies
from textdiff.training.pretrain import PretrainSettings

from ..configs.settings import AppSettings
from .base import StatsTrainTask

logger = logging.getLogger(__name__)


class CDMTrain(StatsTrainTask):
    def __init__(self, settings: AppSettings, cfg: CDMConfig, arch: BackboneConfig, backbone_for_training,
                 description: str):
        self.folder = Path(settings.model_dir) / "cdm"
        super().__init__(
            description,
            {"max_epochs": settings.cdm_epochs, "train_batch_size": settings.pretrain_batch_size,
             "learning_rate": 3e-4, "embedding_learning_rate": 3e-3, "start_from_backbone": True},
            Path(settings.model_dir) / "cdm_stats.json", settings.train_threads,
        )
        self.cfg = cfg
        self.arch = arch
        self.backbone_for_training = backbone_for_training

    @property
    def model_file(self) -> Path:
        """The file whose change means a new CDM (the folder is replaced as a whole)."""
        return self.folder / CONFIG_FILE

    def pre_process(self, request, datastore: Datastore) -> list[Case]:
        return read_studies(datastore.studies_dir)

    def train(self, request, data: list[Case]) -> dict:
        start = time.time()
        init = self.backbone_for_training() if request.get("start_from_backbone", True) else None
        settings = PretrainSettings(epochs=int(request["max_epochs"]), batch_size=int(request["train_batch_size"]),
                                    lr=float(request["learning_rate"]),
                                    class_embedding_lr=float(request["embedding_learning_rate"]))
        logger.info("training the CDM on the image-level labels of %d images for %d epochs, from %s",
                    len(data), settings.epochs, init or "random init")
        history = train_cdm(data, self.folder, self.cfg, settings, arch=self.arch, init=init, progress=False)
        return {"total_time": round(time.time() - start, 1), "epochs": settings.epochs, "start": init,
                "final_loss": history[-1]["loss"], "history": history}
