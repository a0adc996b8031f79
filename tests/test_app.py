"""The MONAI Label app in-process (fastapi TestClient, as MONAI Label's own tests do): infer, reports, labels,
training, active learning, and clear 4xx answers to bad input."""

from __future__ import annotations

import concurrent.futures
import io
import json
import sys
from pathlib import Path

import itk
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import in_process_client, make_deployment  # noqa: E402

REPORT = "Unilateral pulmonary infection, one infected area, lower right lung."


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, h):
    return make_deployment(tmp_path_factory.mktemp("app"), h.tiny_config)


@pytest.fixture(scope="module")
def client(deployment):
    with in_process_client(deployment) as test_client:
        yield test_client


def _infer(client, image: str, **params):
    return client.post(f"/infer/textdiff?image={image}&output=image", data={"params": json.dumps(params)})


def _read(response, suffix: str):
    path = Path(f"/tmp/textdiff-test-mask-{id(response)}{suffix}")
    path.write_bytes(response.content)
    try:
        return itk.imread(str(path))
    finally:
        path.unlink()


def test_info_lists_the_model_its_text_option_and_the_tasks(client):
    info = client.get("/info/").json()
    assert info["models"]["textdiff"]["type"] == "segmentation"
    assert "text" in info["models"]["textdiff"]["config"]  # shown in Slicer's options panel
    assert info["labels"] == ["infection"]  # a list, as OHIF's MONAI Label panel needs
    assert set(info["trainers"]) == {"textdiff", "diffusion_pretrain", "cdm"}
    assert "cdm" not in info["models"]  # no CDM is trained yet
    assert {"random", "first", "uncertainty", "diverse"} <= set(info["strategies"])
    assert "textdiff_uncertainty" in info["scoring"]


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".png"])
def test_infer_returns_a_mask_on_the_image_grid(client, deployment, extension):
    response = _infer(client, "case_0000", result_extension=extension, result_dtype="uint8")
    assert response.status_code == 200, response.text
    mask = _read(response, extension)
    image = itk.imread(str(deployment["studies"] / "case_0000.png"))
    assert tuple(mask.GetLargestPossibleRegion().GetSize())[:2] == tuple(image.GetLargestPossibleRegion().GetSize())
    assert np.allclose(tuple(mask.GetSpacing())[:2], tuple(image.GetSpacing()))
    assert np.allclose(tuple(mask.GetOrigin())[:2], tuple(image.GetOrigin()))
    assert set(np.unique(itk.array_from_image(mask))) <= {0, 1}


def test_infer_json_names_labels_and_the_text_it_used(client, deployment):
    from textdiff.data.studies import read_reports

    report = read_reports(deployment["studies"])["case_0001"][0]
    result = client.post("/infer/textdiff?image=case_0001&output=json").json()
    assert result["label_names"] == {"infection": 1}
    assert (result["text"], result["text_source"]) == (report, "datastore")
    given = client.post("/infer/textdiff?image=case_0001&output=json",
                        data={"params": json.dumps({"text": REPORT})}).json()
    assert (given["text"], given["text_source"]) == (REPORT, "request")
    blank = client.post("/infer/textdiff?image=case_0001&output=json",
                        data={"params": json.dumps({"text": "  "})}).json()  # Slicer's empty option box
    assert blank["text_source"] == "datastore"


def test_text_changes_the_served_mask_logits(client, deployment):
    """Same image, different text: the server's model output differs (the report reaches the cross-attention)."""
    from monailabel.interfaces.utils.app import app_instance
    from textdiff.data.studies import preprocess_image, read_image

    store = app_instance().model.store
    image = read_image(deployment["studies"] / "case_0002.png", "image")
    x = preprocess_image(image, store.get().image_size, 1)[None]
    a = store.get()(x, [REPORT])
    b = store.get()(x, ["No pulmonary infection."])
    assert not np.allclose(a.detach().numpy(), b.detach().numpy())


def test_a_report_set_through_the_api_is_used_and_survives_a_restart(client, deployment):
    response = client.put("/datastore/image/info?image=case_0003", data={"info": json.dumps({"report": REPORT})})
    assert response.status_code == 200, response.text
    assert client.get("/datastore/image/info?image=case_0003").json()["report"] == REPORT
    assert client.post("/infer/textdiff?image=case_0003&output=json").json()["text"] == REPORT
    from textdiff.data.studies import read_reports

    assert read_reports(deployment["studies"])["case_0003"][0] == REPORT  # on disk, beside the images

    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()  # a new app instance reads the studies folder again, as after a restart
    assert app_instance().datastore().get_image_info("case_0003")["report"] == REPORT


@pytest.mark.parametrize("request_path, status", [
    ("/infer/nope?image=case_0000", 404),
    ("/infer/textdiff?image=no_such_image", 404),
    ("/infer/textdiff?image=../../etc/passwd", 422),
    ("/infer/textdiff?image=/etc/passwd", 422),
    ("/activelearning/nope", 404),
])
def test_bad_requests_get_a_clear_4xx(client, request_path, status):
    response = client.post(request_path)
    assert response.status_code == status
    assert response.json()["detail"]
    assert client.get("/info/").status_code == 200  # still serving


def test_the_viewer_and_worklist_say_they_need_a_pacs(client):
    for path in ("/viewer/", "/viewer/app-config.js", "/labeling/"):
        response = client.get(path)
        assert response.status_code == 404 and "PACS" in response.json()["detail"], (path, response.text)
    response = client.post("/labeling/propose?image=case_0000")
    assert response.status_code == 404 and "PACS" in response.json()["detail"]


def test_bad_reports_are_refused_and_the_old_one_kept(client):
    before = client.get("/datastore/image/info?image=case_0004").json()["report"]
    for bad in ["x" * 5000, 42, ["a list"]]:
        response = client.put("/datastore/image/info?image=case_0004", data={"info": json.dumps({"report": bad})})
        assert response.status_code == 422 and "report" in response.json()["detail"]
    assert client.get("/datastore/image/info?image=case_0004").json()["report"] == before
    text = client.post("/infer/textdiff?image=case_0004&output=json", data={"params": json.dumps({"text": 7})})
    assert text.status_code == 422


def test_a_wrong_label_is_refused_and_the_saved_one_kept(client, deployment):
    final = deployment["studies"] / "labels" / "final" / "case_0000.png"
    before = final.read_bytes()
    for pixels in [np.zeros((10, 10), np.uint8), np.full((64, 64), 7, np.uint8)]:  # wrong size, unknown class
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        response = client.put("/datastore/label?image=case_0000&tag=final",
                              files={"label": ("case_0000.png", buffer.getvalue(), "image/png")})
        assert response.status_code == 422, response.text
    assert final.read_bytes() == before


def test_clients_on_other_machines_are_refused_without_a_login(client):
    """The bare `monailabel start_server` listens on every interface: the app answers only this machine's clients."""
    from fastapi.testclient import TestClient
    from monailabel.app import app

    from lib.endpoints.local_only import is_local

    remote = TestClient(app, client=("203.0.113.5", 40000))
    refused = remote.get("/info/")
    assert refused.status_code == 403 and "--conf trusted_networks" in refused.json()["detail"]
    assert remote.post("/infer/textdiff?image=case_0001").status_code == 403
    assert client.get("/info/").status_code == 200
    assert all(map(is_local, ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1", "localhost", None)))
    assert not any(map(is_local, ("10.0.0.2", "::ffff:10.0.0.2", "fe80::1", "example.org")))


def test_gpu_logs_say_there_is_no_gpu_instead_of_failing(client, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    response = client.get("/logs/gpu")
    assert response.status_code == 404 and "no NVIDIA GPU" in response.json()["detail"]


def test_a_corrupt_or_unsupported_upload_is_refused(client, deployment):
    response = client.put("/datastore/image?image=broken", files={"file": ("broken.png", b"not a png", "image/png")})
    assert response.status_code == 422 and "corrupt" in response.json()["detail"]
    response = client.put("/datastore/image?image=notes", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert response.status_code == 422
    response = client.put("/datastore/image?image=..%2Fescape", files={"file": ("x.png", b"x", "image/png")})
    assert response.status_code == 422
    assert not (deployment["studies"].parent / "escape.png").exists()
    assert "broken" not in client.get("/datastore/?output=all").json()["objects"]


def test_sixteen_concurrent_infer_requests_all_succeed(client):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda i: _infer(client, f"case_000{i % 6}", result_extension=".nrrd"), range(16)))
    assert [r.status_code for r in responses] == [200] * 16


def test_active_learning_strategies_return_unlabeled_images(client, deployment):
    unlabeled = {"case_0004", "case_0005"}
    for strategy in ("random", "first", "uncertainty"):
        assert client.post(f"/activelearning/{strategy}").json()["id"] in unlabeled, strategy
    scores = [client.get(f"/datastore/image/info?image={k}").json()["textdiff_uncertainty"] for k in sorted(unlabeled)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    cached = {p.stem for p in (deployment["model_dir"] / "feature-cache").rglob("*.pt")}
    assert unlabeled <= cached  # scoring keeps diffusion features on disk: rescoring reruns only the head
    most_uncertain = sorted(unlabeled)[int(np.argmax(scores))]
    assert client.post("/activelearning/uncertainty").json()["id"] == most_uncertain
    # diverse remembers what it handed out: two clicks give the two different unlabeled images, then nothing
    picks = [client.post("/activelearning/diverse").json().get("id") for _ in range(3)]
    assert set(picks[:2]) == unlabeled and picks[2] is None


def test_an_image_known_to_be_normal_is_never_asked_for(client):
    """Its mask is known to be empty (training uses it so): uncertainty passes over it, however unsure the model."""
    unlabeled = {"case_0004", "case_0005"}
    normal = client.post("/activelearning/uncertainty").json()["id"]
    response = client.put(f"/datastore/image/info?image={normal}", data={"info": json.dumps({"image_label": "normal"})})
    assert response.status_code == 200, response.text
    try:
        assert client.post("/activelearning/uncertainty").json()["id"] == (unlabeled - {normal}).pop()
    finally:
        client.put(f"/datastore/image/info?image={normal}", data={"info": json.dumps({"image_label": ""})})


def test_training_publishes_a_new_model_that_infer_uses_without_restart(client, deployment):
    checkpoint = deployment["model_dir"] / "textdiff.pt"
    before = checkpoint.stat().st_mtime_ns
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 30, "learning_rate": 0.01})
    assert response.status_code == 200, response.text
    assert checkpoint.stat().st_mtime_ns != before, response.json()
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["labeled_images"] == 4 and len(stats["history"]) == 30
    from monailabel.interfaces.utils.app import app_instance

    assert _infer(client, "case_0001", result_extension=".nrrd").status_code == 200
    assert app_instance().model.store.version == checkpoint.stat().st_mtime_ns
    # uncertainty scores from the old model are stale: the strategy rescores with the new one
    picked = client.post("/activelearning/uncertainty").json()["id"]
    info = client.get(f"/datastore/image/info?image={picked}").json()
    assert info["textdiff_uncertainty_model"] == checkpoint.stat().st_mtime_ns


def test_a_retrain_starts_from_the_head_in_service_unless_asked_not_to(client, deployment):
    """A few steps at a tiny learning rate move a head little: the published head stays near the one it started
    from, which is the head in service when the run continues it and a new one otherwise."""
    import torch

    model_dir = deployment["model_dir"]

    def retrain(**params) -> tuple[dict, float]:
        response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 0, "max_steps": 2,
                                                                      "learning_rate": 1e-9, "force": True, **params})
        assert response.status_code == 200, response.text
        heads = [torch.load(model_dir / name, weights_only=True)["head"] for name in ("textdiff.prev.pt", "textdiff.pt")]
        change = max((heads[1][k].float() - v.float()).abs().max().item() for k, v in heads[0].items()
                     if k.endswith("weight"))
        return client.get("/info/").json()["train_stats"]["textdiff"], change

    stats, change = retrain()
    assert stats["continued_from_current"] is True and stats["steps"] == 2 and change < 1e-3 and stats["passes"] > 0
    stats, change = retrain(continue_from_current=False)
    assert stats["continued_from_current"] is False and change > 1e-2


def test_intensity_copies_are_a_train_param(client):
    from monailabel.interfaces.utils.app import app_instance

    trainer = app_instance()._trainers["textdiff"]
    assert trainer.check_params({"intensity_copies": "3"}) == {"intensity_copies": 3}
    request = trainer.config()  # a run reads every param at its type (`StatsTrainTask.__call__`)
    assert trainer.run_config({**request, "intensity_copies": 3}, backbone="some/backbone").train.intensity_copies == 3
    assert trainer.run_config(request, backbone="some/backbone").train.intensity_copies == 0  # off unless asked


def test_a_volume_is_segmented_slice_by_slice_onto_its_own_grid(client, tmp_path):
    volume = itk.image_from_array(np.random.default_rng(0).random((3, 40, 48)).astype(np.float32))
    volume.SetSpacing([0.7, 0.9, 2.5])
    volume.SetOrigin([-20.0, 13.0, 4.0])
    itk.imwrite(volume, str(tmp_path / "vol.nii.gz"))
    with open(tmp_path / "vol.nii.gz", "rb") as handle:
        added = client.put("/datastore/image?image=volume_01", files={"file": ("volume_01.nii.gz", handle)},
                           data={"params": json.dumps({"report": REPORT})})
    assert added.status_code == 200, added.text
    response = _infer(client, "volume_01", result_extension=".nii.gz")
    assert response.status_code == 200, response.text
    mask = _read(response, ".nii.gz")
    assert tuple(mask.GetLargestPossibleRegion().GetSize()) == (48, 40, 3)
    assert np.allclose(tuple(mask.GetSpacing()), (0.7, 0.9, 2.5)) and np.allclose(tuple(mask.GetOrigin()), (-20, 13, 4))
    assert client.get("/datastore/image/info?image=volume_01").json()["report"] == REPORT
    assert _infer(client, "volume_01", result_extension=".png").status_code == 422  # a volume is not one PNG


def test_pretraining_writes_a_new_backbone_and_retrains_the_head_on_it(client, deployment):
    response = client.post("/train/diffusion_pretrain?run_sync=true", json={"max_epochs": 1})
    assert response.status_code == 200, response.text
    stats = client.get("/info/").json()["train_stats"]["diffusion_pretrain"]
    backbone = stats["backbone"]
    assert (deployment["model_dir"] / "backbones").resolve() in Path(backbone).resolve().parents
    from textdiff.model.segmenter import load_checkpoint_config

    assert load_checkpoint_config(deployment["model_dir"] / "textdiff.pt").backbone.pretrained == backbone
    assert stats["head"]["continued_from_current"] is False  # a new backbone gets a new head
    assert stats["stopped"] == "all epochs done" and stats["epochs"] == 1
    assert _infer(client, "case_0002", result_extension=".nrrd").status_code == 200


def test_a_dicom_image_gets_a_mask_on_its_patient_grid(client, h, tmp_path):
    pixels = (np.random.default_rng(1).random((40, 48)) * 1000).astype(np.uint16)
    path = h.write_dicom(tmp_path / "ct_01.dcm", pixels, spacing=(0.8, 0.6), origin=(10.0, -5.0, 3.0))
    with open(path, "rb") as handle:
        added = client.put("/datastore/image?image=ct_01", files={"file": ("ct_01.dcm", handle)})
    assert added.status_code == 200, added.text
    response = _infer(client, "ct_01", result_extension=".nrrd")
    assert response.status_code == 200, response.text
    mask, image = _read(response, ".nrrd"), itk.imread(str(path))
    assert tuple(mask.GetLargestPossibleRegion().GetSize())[:2] == (48, 40)
    assert np.allclose(tuple(mask.GetSpacing())[:2], tuple(image.GetSpacing())[:2])
    assert np.allclose(tuple(mask.GetOrigin()), tuple(image.GetOrigin()))


def test_an_uploaded_image_is_segmented_without_entering_the_datastore(client, deployment):
    before = set(client.get("/datastore/?output=all").json()["objects"])
    with open(deployment["studies"] / "case_0002.png", "rb") as handle:
        response = client.post("/infer/textdiff?output=json", files={"file": ("upload.png", handle, "image/png")},
                               data={"params": json.dumps({"text": REPORT})})
    assert response.status_code == 200, response.text
    assert response.json()["text"] == REPORT
    assert set(client.get("/datastore/?output=all").json()["objects"]) == before
