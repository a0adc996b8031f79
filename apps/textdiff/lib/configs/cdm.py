"""TaskConfig for the `cdm` model: weak supervision from image-level labels, to pre-annotate before any mask exists."""

from __future__ import annotations

from pathlib import Path

from monailabel.interfaces.config import TaskConfig
from textdiff.weak.cdm import load_cdm
from textdiff.config import BackboneConfig, CDMConfig

from ..infers.cdm import CDMInfer
from ..model_store import ModelStore
from ..trainers.cdm import CDMTrain
from .settings import AppSettings


class CDMTaskConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict, planner, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        settings = AppSettings.from_conf(conf, kwargs["app_dir"])
        self.cfg = CDMConfig()
        self.labels = kwargs["labels"]  # the mask uses the textdiff label map, so it can become a textdiff label
        self.trainer_task = CDMTrain(settings, self.cfg, BackboneConfig(image_size=settings.image_size),
                                     kwargs["backbone_for_training"],
                                     "Train the class-conditional diffusion model on image-level labels (no masks)")
        self.store = ModelStore(self.trainer_task.model_file, settings.device,
                                lambda path, device: load_cdm(Path(path).parent, device))

    def infer(self):
        return {self.name: CDMInfer(self.store, self.labels,
                                    "CDM: a mask from image-level labels only, to pre-annotate unlabeled images")}

    def trainer(self):
        return self.trainer_task
