"""The `textdiff` infer task: image + report -> mask on the image's own grid (2D, or a volume slice by slice).

Its three lists are the library's (`textdiff.inference`): pre_transforms read the image and put each plane on the
working grid, the inferer reads windows with the report beside them, post_transforms bring the class per pixel back
to the image's grid; the writer keeps the file's geometry (Slicer's .nrrd, DICOM spacing, NIfTI affines, TIFF).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from textdiff.data.studies import check_report
from textdiff.inference import ReportInferer, post_transforms, pre_transforms
from textdiff.writers import label_colour, mask_extension, save_mask

from ..errors import bad_request, client_errors
from ..model_store import ModelStore
from .base import StoreInferTask

RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".png")


class TextDiffInfer(StoreInferTask):
    """Segmentation from a frozen diffusion backbone and the image's report.

    The text is the request's `text` param when it is not empty, else the image's report in the datastore (the app
    puts it in the request as `report`), else empty. `text` is in the config so Slicer's options panel shows it.
    Dimension 3: it serves volumes (slice by slice) as well as 2D images, which Slicer sends as one-slice volumes.
    """

    def __init__(self, store: ModelStore, labels: dict[str, int], description: str, fast: bool = True):
        super().__init__(store, labels, description, config={"text": ""}, dimension=3)
        self.fast = fast  # bfloat16 where the CPU computes it natively (`textdiff.inference.serving_precision`)

    def pre_transforms(self, data=None):
        return [self._text, *pre_transforms(self.store.get().cfg.backbone)]

    def inferer(self, data=None):
        return ReportInferer(data["text_used"], data["blank"], fast=self.fast)

    def post_transforms(self, data=None):
        return post_transforms(data["original_shape"], len(data["blank"]))

    @staticmethod
    def _text(data: dict) -> dict:
        """The text the model reads, and where it came from (request, datastore or none)."""
        text, data["text_source"] = data.get("text"), "request"
        if text is None or (isinstance(text, str) and not text.strip()):
            text, data["text_source"] = data.get("report") or "", "datastore" if data.get("report") else "none"
        data["text_used"] = check_report(text, "the 'text' param")
        return data

    def writer(self, data: dict, extension=None, dtype=None):
        """Write the mask with the image file's geometry in the format the client asks for (default: the image's)."""
        image_path = Path(data["image_path"])
        ext = data.get("result_extension") or mask_extension(image_path)
        if ext not in RESULT_EXTENSIONS:
            raise bad_request(f"result_extension {ext!r} is not supported: use one of {', '.join(RESULT_EXTENSIONS)}")
        if data.get("result_dtype") not in (None, "uint8"):
            raise bad_request(f"result_dtype {data['result_dtype']!r} is not supported: masks are uint8")
        out = Path(tempfile.NamedTemporaryFile(suffix=ext, delete=False).name)
        with client_errors():
            save_mask(data["pred"], image_path, out, compress=bool(data.get("result_compress", True)))
        result = {"text": data["text_used"], "text_source": data["text_source"],
                  "foreground_pixels": int((data["pred"] > 0).sum()),
                  "label_colors": {name: label_colour(index) for name, index in self.labels.items()}}
        return str(out), result
