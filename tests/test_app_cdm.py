"""The app's `cdm` model through MONAI Label's REST API: train on image-level labels, pre-annotate, pseudo-labels."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import itk
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import in_process_client, make_deployment  # noqa: E402


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, h):
    deployment = make_deployment(tmp_path_factory.mktemp("cdm-app"), h.tiny_config)
    deployment["conf"] = {**deployment["conf"], "cdm_epochs": "1"}
    return deployment


@pytest.fixture(scope="module")
def client(deployment):
    with in_process_client(deployment) as test_client:
        yield test_client


def _infer(client, image: str, **params):
    return client.post(f"/infer/cdm?image={image}&output=all", data={"params": json.dumps(params)})


def _parts(response) -> tuple[dict, bytes]:
    """The JSON and the file of a multipart infer answer."""
    from requests_toolbelt.multipart import decoder

    result, payload = {}, b""
    for part in decoder.MultipartDecoder(response.content, response.headers["content-type"]).parts:
        if b"application/json" in part.headers.get(b"Content-Type", b""):
            result = json.loads(part.content)
        else:
            payload = part.content
    return result, payload


def _image(payload: bytes, suffix: str, tmp_path: Path):
    path = tmp_path / f"result{suffix}"
    path.write_bytes(payload)
    return itk.imread(str(path))


def _image_ids(deployment, label: str) -> list[str]:
    rows = (deployment["studies"] / "reports.csv").read_text().splitlines()[1:]
    return [row.split(",")[0].removesuffix(".png") for row in rows if row.endswith(f",{label}")]


def test_cdm_is_trained_on_image_labels_then_pre_annotates_through_the_server(client, deployment, tmp_path):
    infected, normal = _image_ids(deployment, "infection"), _image_ids(deployment, "normal")
    assert _infer(client, infected[0]).status_code == 404  # no CDM yet: train it first

    response = client.post("/train/cdm?run_sync=true", json={"max_epochs": 1})
    assert response.status_code == 200, response.text
    info = client.get("/info/").json()
    assert info["train_stats"]["cdm"]["epochs"] == 1
    assert {"image_label", "soft_map", "largest_component"} <= set(info["models"]["cdm"]["config"])
    drawn = {p.stem for p in (deployment["studies"] / "labels" / "final").glob("*.png")} & set(infected)
    readout = info["train_stats"]["cdm"]["readout"]  # chosen on the final masks of 3 or more abnormal images
    assert (readout is not None) == (len(drawn) >= 3)
    if readout:
        saved = json.loads((deployment["model_dir"] / "cdm" / "cdm.json").read_text())
        assert all(saved[key] == value for key, value in readout.items())
    scored = info["train_stats"]["cdm"]["final_mask_dice"]  # scored against the final masks that exist
    assert scored["images"] >= 1 and 0 <= scored["dice"] <= 1
    assert info["models"]["cdm"]["final_mask_dice"] == scored
    assert info["models"]["cdm"]["proposal_dice"] == {"dice": None, "images": 0}  # no proposal corrected yet

    response = _infer(client, infected[0], result_extension=".nrrd", result_dtype="uint8")
    assert response.status_code == 200, response.text
    result, payload = _parts(response)
    assert result["image_label"] == "infection" and result["output"] == "mask"  # from the datastore
    mask = _image(payload, ".nrrd", tmp_path)
    image = itk.imread(str(deployment["studies"] / f"{infected[0]}.png"))
    assert tuple(mask.GetLargestPossibleRegion().GetSize())[:2] == tuple(image.GetLargestPossibleRegion().GetSize())
    assert np.allclose(tuple(mask.GetSpacing())[:2], tuple(image.GetSpacing()))
    assert set(np.unique(itk.array_from_image(mask))) <= {0, 1}
    assert result["foreground_pixels"] == int(itk.array_from_image(mask).sum()) > 0

    result, _ = _parts(_infer(client, normal[0]))
    assert result["image_label"] == "normal" and result["foreground_pixels"] == 0  # healthy: empty mask

    response = _infer(client, infected[0], soft_map=True, result_extension=".nrrd")
    result, payload = _parts(response)
    soft = itk.array_from_image(_image(payload, ".nrrd", tmp_path))
    assert result["output"] == "soft_map" and soft.dtype == np.float32 and 0 <= soft.min() and soft.max() <= 1
    assert soft.shape[-2:] == itk.array_from_image(image).shape[-2:]

    assert _infer(client, infected[0], soft_map=True, result_extension=".png").status_code == 422
    assert _infer(client, infected[0], soft_map=True, save_label=True).status_code == 422
    assert _infer(client, infected[0], image_label="fracture").status_code == 422


def test_pre_annotations_become_original_labels_and_optional_pseudo_labels(client, deployment):
    if "cdm" not in client.get("/info/").json()["models"]:
        assert client.post("/train/cdm?run_sync=true", json={"max_epochs": 1}).status_code == 200
    images = set(client.get("/datastore/?output=all").json()["objects"])
    unlabeled = [i for i in images if not (deployment["studies"] / "labels" / "final" / f"{i}.png").exists()]
    assert unlabeled
    response = client.post("/batch/infer/cdm?images=unlabeled&run_sync=true", json={"label_tag": "original"})
    assert response.status_code == 200, response.text
    objects = client.get("/datastore/?output=all").json()["objects"]
    for image in unlabeled:
        assert objects[image]["labels"]["original"]["info"]["model"] == "cdm", objects[image]
        label = client.get(f"/datastore/label?label={image}&tag=original")
        assert label.status_code == 200 and label.content

    from lib.trainers.textdiff import pseudo_labeled_cases
    from monailabel.interfaces.utils.app import app_instance

    assert sorted(c.id for c in pseudo_labeled_cases(app_instance().datastore())) == sorted(unlabeled)
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1, "pseudo_labels": True})
    assert response.status_code == 200, response.text
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["labeled_images"] == 4 and stats["pseudo_labeled_images"] == len(unlabeled)
    # the run also trained without them and kept the better, saying which
    assert stats["kept"]["extras"] == "pseudo-labels" and stats["kept"]["kept"].endswith("pseudo-labels")
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["pseudo_labeled_images"] == 0 and stats["kept"] is None  # off by default, nothing to compare


def test_info_scores_the_proposals_a_clinician_corrected(client, deployment):
    """A CDM proposal, then a final label of the same image: /info shows their Dice."""
    from PIL import Image

    if "cdm" not in client.get("/info/").json()["models"]:
        assert client.post("/train/cdm?run_sync=true", json={"max_epochs": 1}).status_code == 200
    image = _image_ids(deployment, "infection")[-1]
    assert not (deployment["studies"] / "labels" / "final" / f"{image}.png").exists()
    response = client.post(f"/infer/cdm?image={image}", data={"params": json.dumps({"save_label": True,
                                                                                     "label_tag": "original"})})
    assert response.status_code == 200, response.text
    proposal_file = client.get(f"/datastore/label?label={image}&tag=original")
    proposal = np.asarray(Image.open(io.BytesIO(proposal_file.content))) > 0
    corrected = np.zeros_like(proposal)
    corrected[10:30, 10:30] = True
    buffer = io.BytesIO()
    Image.fromarray(corrected.astype(np.uint8)).save(buffer, format="PNG")
    response = client.put(f"/datastore/label?image={image}&tag=final",
                          files={"label": (f"{image}.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    try:
        expected = 2 * (proposal & corrected).sum() / (proposal.sum() + corrected.sum())
        measured = client.get("/info/").json()["models"]["cdm"]["proposal_dice"]
        assert measured["images"] == 1 and measured["dice"] == pytest.approx(expected, abs=1e-4)
    finally:
        assert client.delete(f"/datastore/label?id={image}&tag=final").status_code == 200


def test_healthy_images_join_textdiff_training_with_empty_masks(client, deployment):
    labeled = {p.name.removesuffix(".png") for p in (deployment["studies"] / "labels" / "final").glob("*.png")}
    unlabeled = sorted(set(client.get("/datastore/?output=all").json()["objects"]) - labeled)
    info = client.get(f"/datastore/image/info?image={unlabeled[0]}").json()
    assert info["image_label"] == "infection"  # made normal for this test, then restored
    client.put(f"/datastore/image/info?image={unlabeled[0]}", data={"info": json.dumps({"image_label": "normal"})})
    try:
        response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})  # on by default: normal
        assert response.status_code == 200, response.text
        stats = client.get("/info/").json()["train_stats"]["textdiff"]
        assert stats["healthy_images"] == 1 and stats["labeled_images"] == len(labeled)
        response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1, "healthy_label": 3})
        assert response.status_code == 422 and "healthy_label must be text" in response.text
        response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1, "healthy_label": ""})
        assert response.status_code == 200, response.text
        assert client.get("/info/").json()["train_stats"]["textdiff"]["healthy_images"] == 0  # "" turns it off
    finally:
        client.put(f"/datastore/image/info?image={unlabeled[0]}",
                   data={"info": json.dumps({"image_label": info["image_label"]})})


def test_cdm_training_without_healthy_images_is_refused(client, deployment):
    normal = _image_ids(deployment, "normal")
    for image in normal:
        assert client.put(f"/datastore/image/info?image={image}", data={"info": json.dumps({"image_label": "infection"})}).status_code == 200
    try:
        response = client.post("/train/cdm", json={"max_epochs": 1})
        assert response.status_code == 422 and "healthy" in response.json()["detail"]
    finally:
        for image in normal:
            client.put(f"/datastore/image/info?image={image}", data={"info": json.dumps({"image_label": "normal"})})


def test_textdiff_trains_on_reports_of_unlabeled_images_and_obeys_them(client, deployment, tmp_path):
    """The `report_weight` and `obey_report` train params: the unlabeled images' reports join training, and the
    served masks then follow the report (nothing under "No pulmonary infection.")."""
    labeled = {p.name.removesuffix(".png") for p in (deployment["studies"] / "labels" / "final").glob("*.png")}
    unlabeled = set(client.get("/datastore/?output=all").json()["objects"]) - labeled
    infected_unlabeled = unlabeled & set(_image_ids(deployment, "infection"))
    assert infected_unlabeled
    for bad in ("much", -1, "nan"):
        response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1, "report_weight": bad})
        assert response.status_code == 422 and "report_weight" in response.text
    response = client.post("/train/textdiff?run_sync=true",
                           json={"max_epochs": 1, "report_weight": "0.5", "obey_report": True})
    assert response.status_code == 200, response.text
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["report_weight"] == 0.5 and stats["obey_report"] is True
    assert stats["report_images"] == len(infected_unlabeled)  # the healthy ones train with an empty mask instead
    image = _image_ids(deployment, "infection")[0]
    response = client.post(f"/infer/textdiff?image={image}&output=image",
                           data={"params": json.dumps({"text": "No pulmonary infection.", "result_extension": ".nrrd"})})
    assert response.status_code == 200, response.text
    assert not itk.array_from_image(_image(response.content, ".nrrd", tmp_path)).any()
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})  # both off by default
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["report_weight"] == 0.0 and stats["obey_report"] is False and stats["report_images"] == 0
