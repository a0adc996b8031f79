"""Build a tiny TextDiff Label deployment (studies folder, tiny backbone, tiny trained head) for the app tests."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

from textdiff.backbone import build_scheduler, build_unet, save_diffusion
from textdiff.data import read_studies
from textdiff.sample_data import make_sample_data
from textdiff.train import train_on_cases

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "textdiff"


def make_deployment(root: Path, tiny_config) -> dict:
    """studies/ (6 images, 4 labeled, reports.csv), model/ (tiny backbone + head), and the app's --conf."""
    data = root / "data"
    make_sample_data(data, n_train=6, n_test=1, n_labeled=4, size=64)
    studies = root / "studies"
    shutil.copytree(data / "train", studies)
    model_dir = root / "model"
    cfg = tiny_config()
    backbone = model_dir / "backbones" / "tiny"
    save_diffusion(build_unet(cfg.backbone), build_scheduler(cfg.backbone), backbone)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, pretrained=str(backbone)),
                              train=dataclasses.replace(cfg.train, epochs=1))
    train_on_cases(read_studies(studies), cfg, model_dir / "textdiff.pt", progress=False)
    conf = {"model_dir": str(model_dir), "demo_weights": "false", "epochs": "2", "pretrain_epochs": "1",
            "pretrain_batch_size": "4", "image_size": "32"}
    return {"studies": studies, "model_dir": model_dir, "conf": conf, "groundtruth": data / "train-groundtruth",
            "conf_json": json.dumps(conf)}


def wait_until_serving(process, url: str, log: Path, seconds: float = 240) -> None:
    """Wait for a started `monailabel start_server` to answer /info/; fail with its log if it dies or hangs."""
    import pytest
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(1)
    pytest.fail("server did not start: " + log.read_text()[-3000:])


@contextlib.contextmanager
def in_process_client(deployment: dict):
    """A fastapi TestClient on the app served from `deployment`, as MONAI Label's own tests build one."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(deployment["studies"])
    settings.MONAI_LABEL_APP_CONF = deployment["conf"]
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    clear_cache()
    from monailabel.app import app

    with TestClient(app) as test_client:
        yield test_client
    clear_cache()
