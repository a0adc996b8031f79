"""The `diffusion_pretrain` train task: the denoising backbone learns from every image, labeled or not.

Each run writes a new backbone folder (model/backbones/<run id>); the current head keeps pointing at the backbone it
was trained on, so inference never mixes a head with a backbone it has not seen. When labeled images exist the head
is retrained on the new backbone in the same job, and publishing that head switches the app over.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from monailabel.interfaces.datastore import Datastore
from textdiff.config import BackboneConfig
from textdiff.training.pretrain import STOP_REASONS, PretrainSettings, pretrain

from ..configs.settings import AppSettings
from .base import StatsTrainTask
from .textdiff import TextDiffTrain, healthy_image_cases, labeled_cases, unlabeled_cases

logger = logging.getLogger(__name__)


class DiffusionPretrain(StatsTrainTask):
    def __init__(self, settings: AppSettings, backbone: BackboneConfig, head_trainer: TextDiffTrain, description: str):
        self.model_dir = Path(settings.model_dir)
        super().__init__(
            description,
            {"max_minutes": settings.pretrain_minutes, "max_epochs": settings.pretrain_epochs,
             "patience": settings.pretrain_patience, "train_batch_size": settings.pretrain_batch_size,
             "learning_rate": 2e-4, "continue_from_current": True, "retrain_head": True},
            self.model_dir / "pretrain_stats.json",
        )
        self.settings = settings
        self.backbone = backbone
        self.head_trainer = head_trainer

    def pre_process(self, request, datastore: Datastore) -> dict:
        """All images of the studies folder (pretraining needs no labels); the labeled and (with the head's default
        healthy_label) healthy ones for the head, and (with its default report_weight) the unlabeled ones."""
        head = self.head_trainer.config()
        return {"studies": datastore.studies_dir, "labeled": labeled_cases(datastore),
                "healthy": healthy_image_cases(datastore, head["healthy_label"]),
                "unlabeled": unlabeled_cases(datastore) if head["report_weight"] else []}

    def train(self, request, data: dict) -> dict:
        start = time.time()
        out = self.model_dir / "backbones" / request["run_id"]
        current = self.head_trainer.backbone_for_training() if request["continue_from_current"] else None
        settings = PretrainSettings(epochs=max(1, request["max_epochs"]), batch_size=request["train_batch_size"],
                                    lr=request["learning_rate"], max_minutes=request["max_minutes"],
                                    patience=request["patience"] or None, bfloat16=self.settings.pretrain_bfloat16)
        cfg = dataclasses.replace(self.backbone, image_size=self.settings.image_size,
                                  patch_scale=self.settings.patch_scale or None, max_windows=self.settings.max_windows)
        logger.info("pretraining the diffusion backbone on %s for at most %g min (%d epochs) -> %s (from %s)",
                    data["studies"], settings.max_minutes, settings.epochs, out, current or "random init")
        history = pretrain([data["studies"]], out, cfg, settings, init=current, progress=False)
        stats = {"total_time": round(time.time() - start, 1), "epochs": len(history), "backbone": str(out),
                 "stopped": STOP_REASONS[history[-1]["stopped"]], "final_loss": history[-1]["loss"],
                 "history": history}
        if data["labeled"] and request["retrain_head"]:
            head_request = {**self.head_trainer.config(), "device": request["device"]}
            base = None if current else dataclasses.replace(self.head_trainer.cfg, backbone=cfg)  # a fresh architecture
            head_data = {"labeled": data["labeled"], "pseudo": [], "healthy": data["healthy"],
                         "unlabeled": data["unlabeled"],
                         "synthetic": self.head_trainer.synthetic_pairs(head_request)}
            head = self.head_trainer.train(head_request, head_data, backbone=str(out), base=base)
            stats["head"] = {k: v for k, v in head.items() if k != "history"}
        return stats
