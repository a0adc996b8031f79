"""What the app's infer tasks share: a model from a ModelStore (not a TorchScript `path`), the image read with its
geometry kept for the writer, and no MONAI pre/post transform chain (the library does that work)."""

from __future__ import annotations

from pathlib import Path

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from textdiff.data.studies import read_image

from ..errors import client_errors
from ..model_store import ModelStore


class StoreInferTask(BasicInferTask):
    def __init__(self, store: ModelStore, labels: dict[str, int], description: str, config: dict):
        super().__init__(path=str(store.checkpoint), network=None, type=InferType.SEGMENTATION, labels=labels,
                         dimension=2, description=description, config=config)
        self.store = store

    def is_valid(self) -> bool:
        """False until the model exists: MONAI Label then leaves it out of /info and the app answers 404."""
        return self.store.exists()

    def pre_transforms(self, data=None):
        return [self._load]

    def inverse_transforms(self, data=None):
        return None

    def post_transforms(self, data=None):
        return []

    @staticmethod
    def _load(data: dict) -> dict:
        with client_errors():
            data["image"] = read_image(Path(data["image_path"]), "image")
        return data
