"""What the app's infer tasks share: a model from a ModelStore (not a TorchScript `path`), and client mistakes found
while reading the image or running the model answered as 4xx (`client_errors`)."""

from __future__ import annotations

from pathlib import Path

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from textdiff.data.studies import read_image

from ..errors import client_errors
from ..model_store import ModelStore


class StoreInferTask(BasicInferTask):
    def __init__(self, store: ModelStore, labels: dict[str, int], description: str, config: dict, dimension: int = 2):
        super().__init__(path=str(store.checkpoint), network=None, type=InferType.SEGMENTATION, labels=labels,
                         dimension=dimension, description=description, config=config)
        self.store = store

    def is_valid(self) -> bool:
        """False until the model exists: MONAI Label then leaves it out of /info and the app answers 404."""
        return self.store.exists()

    def _get_network(self, device, data):
        return self.store.get()

    def run_pre_transforms(self, data: dict, transforms) -> dict:
        with client_errors():
            return super().run_pre_transforms(data, transforms)

    def run_inferer(self, data: dict, convert_to_batch=True, device="cpu") -> dict:
        """The image stays on the CPU: the model moves each batch of windows to its own device."""
        with client_errors():
            return super().run_inferer(data, convert_to_batch, "cpu")

    def pre_transforms(self, data=None):
        return [self._load]

    def inverse_transforms(self, data=None):
        return None

    def post_transforms(self, data=None):
        return []

    @staticmethod
    def _load(data: dict) -> dict:
        data["image"] = read_image(Path(data["image_path"]), "image")
        return data
