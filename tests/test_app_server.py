"""A real `monailabel start_server` on 127.0.0.1, driven the way 3D Slicer (MONAILabelClient) and OHIF do."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import itk
import numpy as np
import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import APP_DIR, make_deployment, running_server  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, h):
    root = tmp_path_factory.mktemp("server")
    deployment = make_deployment(root, h.tiny_config)
    with running_server(root, deployment) as running:
        yield {"url": running.url, **deployment}


def _geometry(image) -> tuple:
    return (tuple(image.GetLargestPossibleRegion().GetSize())[:2], np.round(tuple(image.GetSpacing())[:2], 5).tolist(),
            np.round(tuple(image.GetOrigin())[:2], 5).tolist())


def _finished_training(client, timeout: float = 300) -> dict:
    """Poll `GET /train/` as Slicer does until the job ends; it must end DONE."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.train_status()
        if status["status"] in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status["status"] == "DONE", status
    return status


def test_slicer_flow_next_sample_infer_label_train_infer_again(server, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    assert "textdiff" in client.info()["models"]
    sample = client.next_sample("random", {})
    image_id = sample["id"]
    mask_file, params = client.infer("textdiff", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert params["label_names"] == {"infection": 1}
    image = itk.imread(str(server["studies"] / f"{image_id}.png"))
    assert _geometry(itk.imread(mask_file)) == _geometry(image)

    # the clinician corrects the mask and submits it; then trains and gets the new model without a restart
    truth = server["groundtruth"] / f"{image_id}.png"
    client.save_label(image_id, str(truth), tag="final")
    checkpoint = server["model_dir"] / "textdiff.pt"
    before = checkpoint.stat().st_mtime_ns
    client.train_start("textdiff", {"max_epochs": 30, "learning_rate": 0.01})
    status = _finished_training(client)
    assert any("round 30/30" in line for line in status["details"]), status["details"]  # progress is logged
    assert checkpoint.stat().st_mtime_ns != before
    stats = client.info()["train_stats"]["textdiff"]
    assert stats["labeled_images"] == 5
    mask_file, _ = client.infer("textdiff", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert _geometry(itk.imread(mask_file)) == _geometry(image)


def test_ohif_flow_infer_as_image_and_put_label(server, tmp_path):
    url = server["url"]
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    response = requests.post(f"{url}/infer/textdiff?image=case_0005&output=image",
                             data={"params": json.dumps(params)}, timeout=60)
    assert response.status_code == 200, response.text
    (tmp_path / "mask.nrrd").write_bytes(response.content)
    mask = itk.imread(str(tmp_path / "mask.nrrd"))
    assert _geometry(mask) == _geometry(itk.imread(str(server["studies"] / "case_0005.png")))
    with open(tmp_path / "mask.nrrd", "rb") as handle:
        saved = requests.put(f"{url}/datastore/label?image=case_0005", files={"label": ("case_0005.nrrd", handle)},
                             timeout=60)
    assert saved.status_code == 200, saved.text
    assert "case_0005" in requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    bad = requests.post(f"{url}/infer/textdiff?image=../../etc/passwd", timeout=30)
    assert bad.status_code == 422
    assert requests.get(f"{url}/info/", timeout=30).status_code == 200


def test_training_without_labels_is_refused_up_front(tmp_path, h):
    """Checked in-process on an app whose studies folder has no labels: a clear 4xx, no background job."""
    from fastapi import HTTPException
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    deployment = make_deployment(tmp_path, h.tiny_config)
    for label in (deployment["studies"] / "labels" / "final").iterdir():
        label.unlink()
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    clear_cache()
    app = app_instance(str(APP_DIR), str(deployment["studies"]), deployment["conf"])
    with pytest.raises(HTTPException) as refused:
        app.bundle_path("textdiff")
    assert refused.value.status_code == 422 and "no image has a final label" in refused.value.detail
    clear_cache()


def test_a_backbone_folder_that_does_not_exist_stops_the_start_with_its_name(tmp_path, h):
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    deployment = make_deployment(tmp_path, h.tiny_config)
    clear_cache()
    with pytest.raises(FileNotFoundError, match="no --conf backbone folder 'runs/gpu/small-extra'"):
        app_instance(str(APP_DIR), str(deployment["studies"]),
                     {**deployment["conf"], "backbone": "runs/gpu/small-extra"})
    clear_cache()


def test_background_scoring_stores_an_uncertainty_for_every_unlabeled_image(server):
    url = server["url"]
    for name in ("extra_01", "extra_02"):  # the other tests label every sample image: add unlabeled ones
        with open(server["studies"] / "case_0001.png", "rb") as handle:
            added = requests.put(f"{url}/datastore/image?image={name}", files={"file": (f"{name}.png", handle)},
                                 timeout=30)
        assert added.status_code == 200, added.text
    started = requests.post(f"{url}/scoring/textdiff_uncertainty", timeout=30)
    assert started.status_code == 200, started.text
    deadline = time.time() + 240
    while time.time() < deadline:
        status = requests.get(f"{url}/scoring/", timeout=30).json()
        if status["status"] in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status["status"] == "DONE", status
    assert any("background job at CPU priority 19 (nice)" in line for line in status["details"]), status["details"]
    objects = requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"]
    unlabeled = [key for key, obj in objects.items() if "final" not in obj.get("labels", {})]
    assert unlabeled
    # the job writes the scores into the datastore file; the server's copy reloads when it sees the file change
    deadline = time.time() + 30
    while time.time() < deadline:
        infos = [requests.get(f"{url}/datastore/image/info?image={key}", timeout=30).json() for key in unlabeled]
        if all("textdiff_uncertainty" in info for info in infos):
            break
        time.sleep(1)
    assert all(0.0 <= info["textdiff_uncertainty"] <= 1.0 for info in infos), infos
    picked = requests.post(f"{url}/activelearning/uncertainty", timeout=60).json()
    assert picked["id"] in unlabeled


def test_pretraining_in_the_background_shows_its_epoch_loss_and_time_left(server, tmp_path):
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    client.train_start("diffusion_pretrain", {"max_epochs": 2, "max_minutes": 30, "retrain_head": False})
    status = _finished_training(client)
    progress = [line for line in status["details"] if "epoch 2/2: denoising loss" in line]
    assert progress and re.search(r"\d+\.\d of 30 min left", progress[0]), status["details"]
    stats = client.info()["train_stats"]["diffusion_pretrain"]
    assert stats["epochs"] == 2 and stats["stopped"] == "all epochs done"


def test_cdm_trains_in_the_background_and_pre_annotates_for_slicer(server, tmp_path):
    """Cold start from Slicer: train the CDM on image-level labels (a background job), then fetch its mask."""
    from monailabel.client import MONAILabelClient

    client = MONAILabelClient(server["url"], tmpdir=str(tmp_path))
    client.train_start("cdm", {"max_epochs": 1})
    _finished_training(client)
    assert "cdm" in client.info()["models"]
    mask_file, params = client.infer("cdm", "case_0001", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert params["image_label"] == "infection" and params["label_names"] == {"infection": 1}
    image = itk.imread(str(server["studies"] / "case_0001.png"))
    assert _geometry(itk.imread(mask_file)) == _geometry(image)
    assert params["foreground_pixels"] == int(itk.array_from_image(itk.imread(mask_file)).sum()) > 0
