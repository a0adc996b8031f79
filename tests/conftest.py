"""Shared fixtures: tiny configs, one real text encoder per session, tiny sample data.

Everything is sized so the whole suite runs in a few minutes on two busy CPU cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from textdiff.config import BackboneConfig, HeadConfig, TextConfig, TextDiffConfig, TrainConfig  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads are ~5x slower
# than one (they spin waiting for each other); override with TEXTDIFF_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("TEXTDIFF_TEST_THREADS", "1")))

TINY_SIZE = 32
FEATURE_LAYERS = ("up_blocks.0.resnets.1", "up_blocks.1.resnets.1")
TIMESTEPS = (10, 50, 100)
INFECTED = "Unilateral pulmonary infection, one infected area, upper left lung."
NORMAL = "No pulmonary infection."


def tiny_backbone(**changes) -> BackboneConfig:
    cfg = BackboneConfig(
        image_size=TINY_SIZE,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        timesteps=TIMESTEPS,
        feature_layers=FEATURE_LAYERS,
        max_windows=1,  # each image resized into one window; the tiling tests ask for windows themselves
    )
    return dataclasses.replace(cfg, **changes)


def tiny_config(**head_changes) -> TextDiffConfig:
    return TextDiffConfig(
        backbone=tiny_backbone(),
        text=TextConfig(max_tokens=16),
        head=dataclasses.replace(HeadConfig(dim=16, heads=2, head_channels=(8,)), **head_changes),
        train=TrainConfig(epochs=2, batch_size=2, lr=1e-2, val_fraction=0.0, text_dropout=0.0),
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def random_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_png(path, rng.integers(0, 256, size=(height, width), dtype=np.uint8))


@pytest.fixture(scope="session")
def text_encoder():
    from textdiff.model.text import TextEncoder

    return TextEncoder(TextConfig(max_tokens=16))


@pytest.fixture(scope="session")
def extractor():
    from textdiff.model.backbone import make_extractor

    return make_extractor(tiny_backbone())


@pytest.fixture
def make_model(text_encoder, extractor):
    """Build a TextDiffModel on the shared frozen parts; head settings can be changed per test."""
    from textdiff.model.segmenter import TextDiffModel

    def build(seed: int = 0, **head_changes):
        torch.manual_seed(seed)
        return TextDiffModel(tiny_config(**head_changes), extractor=extractor, text_encoder=text_encoder)

    return build


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from textdiff.data.sample_data import make_sample_data

    out = tmp_path_factory.mktemp("sample")
    make_sample_data(out, n_train=6, n_test=3, n_labeled=4, size=64)
    return out


@pytest.fixture(scope="session")
def labeled_items(sample_dir):
    """The 4 labeled train images and 3 test images of the tiny sample data, loaded at the tiny model size."""
    from textdiff.data.studies import load_case, read_studies

    cases = [c for split in ("train", "test") for c in read_studies(sample_dir / split) if c.label is not None]
    return [load_case(c, TINY_SIZE, 1, 2) for c in cases]


def write_dicom(path: Path, pixels: np.ndarray, spacing=(0.8, 0.6), origin=(10.0, -5.0, 3.0)) -> Path:
    """A single-slice CT DICOM file; `pixels` is (rows, columns); spacing is (row, column) as in PixelSpacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.ImagePositionPatient = list(spacing), list(origin)
    ds.ImageOrientationPatient, ds.SliceThickness = [1, 0, 0, 0, 1, 0], 2.0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), write_like_original=False)
    return path


def count_calls(module: torch.nn.Module):
    """Attach a forward pre-hook that records the batch size of every call; returns (records, handle)."""
    calls: list[int] = []

    def hook(_module, args, kwargs=None):
        calls.append(args[0].shape[0])

    handle = module.register_forward_pre_hook(hook)
    return calls, handle


class Helpers:
    """Builders shared by the test files (conftest is not importable under --import-mode=importlib)."""

    size = TINY_SIZE
    feature_layers = FEATURE_LAYERS
    timesteps = TIMESTEPS
    infected = INFECTED
    normal = NORMAL
    tiny_backbone = staticmethod(tiny_backbone)
    tiny_config = staticmethod(tiny_config)
    write_png = staticmethod(write_png)
    random_png = staticmethod(random_png)
    write_dicom = staticmethod(write_dicom)
    count_calls = staticmethod(count_calls)


@pytest.fixture(scope="session")
def h() -> Helpers:
    return Helpers()
