"""The `textdiff` infer task: image + report -> mask on the image's own grid (2D, or a volume slice by slice)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from textdiff.data.studies import check_report
from textdiff.training.inference import segment_image
from textdiff.training.predict import label_colour, mask_extension, save_mask

from ..errors import bad_request, client_errors
from ..model_store import ModelStore
from .base import StoreInferTask

RESULT_EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".png")


class TextDiffInfer(StoreInferTask):
    """Segmentation from a frozen diffusion backbone and the image's report.

    The text is the request's `text` param when it is not empty, else the image's report in the datastore (the app
    puts it in the request as `report`), else empty. `text` is in the config so Slicer's options panel shows it.
    """

    def __init__(self, store: ModelStore, labels: dict[str, int], description: str, fast: bool = True):
        super().__init__(store, labels, description, config={"text": ""})
        self.fast = fast  # bfloat16 where the CPU computes it natively (`segment_image`)

    def run_inferer(self, data: dict, convert_to_batch=True, device="cpu") -> dict:
        """The model comes from the ModelStore (head checkpoint + frozen parts), not from a TorchScript `path`."""
        text = data.get("text")
        source = "request"
        if text is None or (isinstance(text, str) and not text.strip()):
            text, source = data.get("report") or "", "datastore" if data.get("report") else "none"
        with client_errors():
            data["text_used"] = check_report(text, "the 'text' param")
            data["pred"] = segment_image(self.store.get(), data["image"], data["text_used"], fast=self.fast)
        data["text_source"] = source
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
