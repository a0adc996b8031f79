"""The `cdm` infer task: a mask from image-level supervision only (the CDM), to pre-annotate unlabeled images.

With `save_label: true` MONAI Label stores the mask as the image's `original` label, which Slicer and OHIF open for
a clinician to correct (`POST /batch/infer/cdm` does it for every unlabeled image). With `soft_map: true` the result
is the soft map instead (float32 in [0, 1], .nrrd or .nii.gz) for a look at the evidence behind the mask.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
from textdiff.errors import DataError
from textdiff.weak.cdm import CDM, image_level_label
from textdiff.weak.cdm_masks import cdm_segment
from textdiff.data.studies import Case
from textdiff.writers import mask_extension, save_mask

from ..errors import bad_request, client_errors
from ..model_store import ModelStore
from .base import StoreInferTask

MASK_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".png")
SOFT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii")


class CDMInfer(StoreInferTask):
    """Image (+ its image-level label or report) -> mask, from how the CDM's denoising changes toward healthy.

    The image's class is the request's `image_label`, else its label in the datastore, else read from its report
    ("No pulmonary infection." is healthy); a healthy image gets an empty mask. `largest_component` keeps one region.
    """

    def __init__(self, store: ModelStore, labels: dict[str, int], description: str):
        super().__init__(store, labels, description,
                         config={"image_label": "", "soft_map": False, "largest_component": False})

    def run_inferer(self, data: dict, convert_to_batch=True, device="cpu") -> dict:
        if data.get("soft_map") and data.get("save_label"):
            raise bad_request("a soft map is not a label: ask for the mask (soft_map false) to save it")
        cdm: CDM = self.store.get()
        cfg = dataclasses.replace(cdm.cfg, largest_component=bool(data.get("largest_component")))
        label = data.get("image_label") or image_level_label(
            Case("", Path(data["image_path"]), report=data.get("report") or "", image_label=data.get("stored_label")), cfg)
        with client_errors():
            if label is not None and not isinstance(label, str):
                raise DataError(f"image_label must be text, got {label!r}")
            data["pred"], data["soft"] = cdm_segment(CDM(cdm.unet, cdm.scheduler, cfg).to(cdm.noise.device),
                                                     data["image"], label)
        data["image_label_used"] = label
        return data

    def writer(self, data: dict, extension=None, dtype=None):
        """The mask (uint8) or the soft map (float32) on the image file's own grid."""
        image_path = Path(data["image_path"])
        soft = bool(data.get("soft_map"))
        allowed = SOFT_EXTENSIONS if soft else MASK_EXTENSIONS
        ext = data.get("result_extension") or (".nrrd" if soft else mask_extension(image_path))
        if ext not in allowed:
            raise bad_request(f"result_extension {ext!r} is not supported here: use one of {', '.join(allowed)}")
        wanted = "float32" if soft else "uint8"
        if data.get("result_dtype") not in (None, wanted):
            raise bad_request(f"result_dtype {data['result_dtype']!r} is not supported: the result is {wanted}")
        out = Path(tempfile.NamedTemporaryFile(suffix=ext, delete=False).name)
        with client_errors():
            if soft:
                save_mask(data["soft"], image_path, out, compress=bool(data.get("result_compress", True)), dtype=np.float32)
            else:
                save_mask(data["pred"], image_path, out, compress=bool(data.get("result_compress", True)))
        result = {"image_label": data["image_label_used"], "foreground_pixels": int((data["pred"] > 0).sum()),
                  "soft_map_max": float(data["soft"].max()), "output": "soft_map" if soft else "mask"}
        return str(out), result
