"""The `cdm` train task: the class-conditional diffusion model learns from image-level labels only (no masks).

The labels are the datastore's image labels (reports.csv `label`, or `image_label` set through the image info), else
read from the reports. It starts from the current diffusion backbone when there is one (the class embedding at zero,
so it begins as that denoiser), and publishes model/cdm/ atomically; the `cdm` infer task picks it up. At the end its
masks are scored against the final masks that exist (train stats `final_mask_dice`, the log, the `cdm` entry of /info),
after its read-out (noise level, smoothing, threshold) is chosen on them when there are enough.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from textdiff.weak.cdm import CONFIG_FILE, load_cdm, save_readout, train_cdm
from textdiff.weak.cdm_masks import dice_against_masks
from textdiff.weak.cdm_readout import choose_readout
from textdiff.config import BackboneConfig, CDMConfig
from textdiff.data.studies import Case, DataError, read_studies
from textdiff.training.pretrain import PretrainSettings

from ..configs.settings import AppSettings
from .base import StatsTrainTask

logger = logging.getLogger(__name__)

MIN_READOUT_IMAGES = 3  # final masks of abnormal images before the read-out is chosen on them


class CDMTrain(StatsTrainTask):
    def __init__(self, settings: AppSettings, cfg: CDMConfig, arch: BackboneConfig, backbone_for_training,
                 description: str):
        self.folder = Path(settings.model_dir) / "cdm"
        super().__init__(
            description,
            {"max_epochs": settings.cdm_epochs, "train_batch_size": settings.pretrain_batch_size,
             "learning_rate": 3e-4, "embedding_learning_rate": 3e-3, "start_from_backbone": True},
            Path(settings.model_dir) / "cdm_stats.json",
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
        init = self.backbone_for_training() if request["start_from_backbone"] else None
        settings = PretrainSettings(epochs=request["max_epochs"], batch_size=request["train_batch_size"],
                                    lr=request["learning_rate"], class_embedding_lr=request["embedding_learning_rate"])
        logger.info("training the CDM on the image-level labels of %d images for %d epochs, from %s",
                    len(data), settings.epochs, init or "random init")
        history = train_cdm(data, self.folder, self.cfg, settings, arch=self.arch, init=init, progress=False,
                            maps_folder=self.folder.with_name("cdm-maps"))
        readout = self.choose_readout(data, request["device"])
        return {"total_time": round(time.time() - start, 1), "epochs": settings.epochs, "start": init,
                "final_loss": history[-1]["loss"], "readout": readout,
                "final_mask_dice": self.score(data, request["device"]), "history": history}

    def choose_readout(self, data: list[Case], device) -> dict | None:
        """With final masks on MIN_READOUT_IMAGES or more abnormal images, the read-out that segments them best
        (noise level, smoothing, clipping, threshold, largest component) goes into the new CDM's config; else its
        defaults stay. None when it was not chosen."""
        try:
            chosen, _ = choose_readout(str(self.folder), data, device, minimum=MIN_READOUT_IMAGES, progress=False)
        except DataError as err:
            logger.info("the CDM keeps its default read-out: %s", err)
            return None
        save_readout(self.folder, chosen)
        return chosen

    def score(self, data: list[Case], device) -> dict:
        """The new CDM's masks against the final masks that exist (`dice_against_masks`), logged: a clinician sees
        how far its pre-annotations can be trusted before training TextDiff with them as pseudo-labels. (When the
        read-out was chosen on the same masks, this is its best case.)"""
        scored = dice_against_masks(load_cdm(self.folder, device), data)
        if scored["dice"] is None:
            logger.info("no final mask with foreground yet: the CDM's masks are scored once there are some")
        else:
            logger.info("the CDM's masks reach Dice %.4f against the final masks of %d images", scored["dice"],
                        scored["images"])
        return scored
