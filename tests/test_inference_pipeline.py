"""Inference as MONAI lists: the app's infer task hands MONAI Label the library's pre_transforms, inferer and
post_transforms, and the masks it serves are byte for byte the ones on record.

The records in tests/data are the shipped demo model's REST masks (float32 reading) of sample image case_0070 and of
a three-slice NIfTI volume (case_0070, a blank slice, case_0071). A change meant to change masks rewrites them with
`TEXTDIFF_WRITE_GOLDEN=1 pytest tests/test_inference_pipeline.py`.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import APP_DIR, in_process_client  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "sample-data" / "test"
GOLDEN = Path(__file__).parent / "data"
IMAGES = {"case_0070": "demo-mask-case_0070.png", "volume": "demo-mask-volume.nii.gz"}


def _studies(root: Path) -> Path:
    """A studies folder with one sample image and a volume of two sample images around a blank slice."""
    studies = root / "studies"
    studies.mkdir()
    shutil.copy(SAMPLE / "case_0070.png", studies)
    planes = [np.array(Image.open(SAMPLE / f"case_{n:04d}.png")).T.astype(np.float32) for n in (70, 71)]
    volume = np.stack([planes[0], np.zeros_like(planes[0]), planes[1]], axis=-1)
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 3.0, 1.0])), studies / "volume.nii.gz")
    report = {row["image"]: row["report"] for row in csv.DictReader(open(SAMPLE / "reports.csv"))}["case_0070.png"]
    with open(studies / "reports.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "report", "label"], ["case_0070", report, ""], ["volume", report, ""]])
    return studies


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo model's REST masks, in the float32 reading and the fast one (bfloat16 where the CPU has it)."""
    root = tmp_path_factory.mktemp("golden")
    studies, masks = _studies(root), {}
    for fast in ("false", "true"):
        conf = {"model_dir": str(root / f"model-{fast}"), "fast_infer": fast}
        with in_process_client({"studies": studies, "conf": conf}) as client:
            info = client.get("/info/").json()["models"]["textdiff"]
            for image in IMAGES:
                response = client.post(f"/infer/textdiff?image={image}&output=image")
                assert response.status_code == 200, response.text
                masks[fast, image] = response.content
    return {"masks": masks, "info": info, "root": root}


@pytest.mark.parametrize("image", IMAGES)
def test_the_served_mask_is_byte_for_byte_the_one_on_record(served, image):
    content = served["masks"]["false", image]
    if os.environ.get("TEXTDIFF_WRITE_GOLDEN") == "1":
        (GOLDEN / IMAGES[image]).write_bytes(content)
    assert content == (GOLDEN / IMAGES[image]).read_bytes()


def _pixels(content: bytes, path: Path) -> np.ndarray:
    path.write_bytes(content)
    return np.asarray(nib.load(path).dataobj) if path.name.endswith(".nii.gz") else np.array(Image.open(path))


@pytest.mark.parametrize("image", IMAGES)
def test_the_fast_reading_serves_nearly_the_same_mask(served, image):
    """bfloat16 (where the CPU computes it natively) moves a few boundary pixels, no more."""
    suffix = IMAGES[image][IMAGES[image].index("."):]
    fast = _pixels(served["masks"]["true", image], served["root"] / f"fast{suffix}")
    reference = _pixels((GOLDEN / IMAGES[image]).read_bytes(), served["root"] / f"reference{suffix}")
    assert fast.shape == reference.shape and (fast != reference).mean() < 0.001


def test_the_infer_task_gives_monai_label_the_librarys_three_lists(served):
    """What a reader of the app sees: pre_transforms, an inferer, post_transforms ending in the class per pixel."""
    from monai.transforms import AsDiscreted, CastToTyped, Resized
    from textdiff.inference import PlanesOnGridd, ReadImaged, ReportInferer

    sys.path.insert(0, str(APP_DIR))
    from lib.infers.textdiff import TextDiffInfer
    from lib.model_store import ModelStore

    assert served["info"]["dimension"] == 3  # volumes slice by slice, and 2D images
    store = ModelStore(served["root"] / "model-false" / "textdiff.pt", "cpu")
    task = TextDiffInfer(store, {"infection": 1}, "TextDiff")
    data = {"image": str(SAMPLE / "case_0070.png"), "image_path": str(SAMPLE / "case_0070.png"), "text": "left"}
    pre = task.pre_transforms(data)
    assert [type(t) for t in pre[1:]] == [ReadImaged, PlanesOnGridd]
    data = task.run_pre_transforms(data, pre)
    assert data["text_used"] == "left" and data["original_shape"] == (256, 256)
    assert isinstance(task.inferer(data), ReportInferer)
    post = task.post_transforms(data)
    assert isinstance(post[0], Resized) and isinstance(post[-2], AsDiscreted) and isinstance(post[-1], CastToTyped)
    data = task.run_post_transforms(task.run_inferer(data), post)
    assert data["pred"].shape == (1, 256, 256) and data["pred"].dtype == torch.uint8
