"""TaskConfig for the `textdiff` model: its infer task, trainers, scoring method and strategies, on one ModelStore."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from monailabel.interfaces.config import TaskConfig
from textdiff import sources
from textdiff.config import SMALL_STRUCTURES, TextDiffConfig, with_overrides
from textdiff.errors import DataError
from textdiff.model.cost import check_backbone
from textdiff.model.segmenter import load_checkpoint_config

from ..activelearning.diverse import Diverse
from ..activelearning.uncertainty import Uncertainty
from ..infers.textdiff import TextDiffInfer
from ..model_store import ModelStore
from ..scoring.uncertainty import MaskUncertainty
from ..trainers.pretrain import DiffusionPretrain
from ..trainers.textdiff import TextDiffTrain
from .settings import AppSettings

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"
CHECKPOINT = "textdiff.pt"


class TextDiffTaskConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings = AppSettings.from_conf(conf, kwargs["app_dir"])
        self.model_dir = Path(self.settings.model_dir)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.model_dir / CHECKPOINT
        # a missing or unreadable backbone or text encoder stops the start here, never a download attempt
        if self.settings.backbone:
            check_backbone(self.settings.backbone, "--conf backbone", self.settings.device)
        if self.settings.text_encoder:
            sources.resolve(self.settings.text_encoder, "--conf text_encoder")
        self.cfg = with_overrides(TextDiffConfig(), SMALL_STRUCTURES) if self.settings.small_structures else TextDiffConfig()
        self.cfg.head.label_names = self.settings.label_names
        self.cfg.head.per_scale_entry = self.settings.per_scale_entry
        if self.settings.text_encoder:
            self.cfg.text.encoder = self.settings.text_encoder
        demo = DEMO_DIR / CHECKPOINT
        if self.settings.demo_weights and not checkpoint.exists() and demo.exists():
            if load_checkpoint_config(demo).head.label_names == self.cfg.head.label_names:
                logger.info("no model in %s yet: starting from the sample-data demo weights", self.model_dir)
                shutil.copytree(DEMO_DIR, self.model_dir, dirs_exist_ok=True)
            else:
                logger.info("the demo weights segment other classes than %s: not used", self.cfg.head.label_names[1:])
        if checkpoint.exists() and load_checkpoint_config(checkpoint).head.label_names != self.cfg.head.label_names:
            raise DataError(f"{checkpoint} segments {list(load_checkpoint_config(checkpoint).head.label_names[1:])}, "
                             f"not the configured labels {list(self.cfg.head.label_names[1:])}: start with those "
                             "labels, or with another model_dir for a new model")
        self.labels = {name: index for index, name in enumerate(self.cfg.head.label_names) if index > 0}
        self.store = ModelStore(checkpoint, self.settings.device)
        self.scoring = MaskUncertainty(self.store, self.model_dir / "feature-cache", self.settings.healthy_label)
        self.head_trainer = TextDiffTrain(self.settings, self.cfg, self.backbone_for_training,
                                          "Train the cross-attention and pixel head on the labeled images")

    def backbone_for_training(self) -> str | None:
        """--conf backbone, else the backbone of the current model, else the newest pretrained one, else None."""
        if self.settings.backbone:
            return self.settings.backbone
        if self.store.exists():
            return load_checkpoint_config(self.store.checkpoint).backbone.pretrained
        pretrained = sorted((self.model_dir / "backbones").glob("*/unet"), key=lambda p: p.stat().st_mtime)
        return str(pretrained[-1].parent) if pretrained else None

    def infer(self):
        return {self.name: TextDiffInfer(self.store, self.labels, "TextDiff: diffusion features + report -> mask",
                                         self.settings.fast_infer)}

    def trainer(self):
        return self.head_trainer

    def pretrainer(self) -> DiffusionPretrain:
        return DiffusionPretrain(self.settings, self.cfg.backbone, self.head_trainer,
                                 "Pretrain the diffusion backbone on all images (no labels needed)")

    def strategy(self):
        return {"uncertainty": Uncertainty(self.scoring),
                "diverse": Diverse(self.store, self.model_dir / "feature-cache", self.settings.healthy_label)}

    def scoring_method(self):
        return {"textdiff_uncertainty": self.scoring}
