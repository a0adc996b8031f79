"""The app on data that is not the sample data: colour TIFF tiles larger than the backbone's window, three named
classes (`--conf labels`), a 16-bit PNG and a multi-page TIFF volume in the studies folder."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import itk
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import in_process_client  # noqa: E402

REPORT = "The nuclei are evenly distributed."
LABELS = {"nucleus": 1, "stroma": 2}


def _tile(rng: np.random.Generator, offset: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((56, 72), np.uint8)  # (rows, columns)
    mask[:, 40:] = 2
    mask[8 + offset : 24 + offset, 10:30] = 1
    colours = np.array([[235, 200, 220], [90, 40, 140], [220, 120, 170]], np.uint8)
    return np.clip(colours[mask] + rng.normal(0, 12, (56, 72, 3)), 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, h):
    """4 labeled and 2 unlabeled colour tiles, a 16-bit PNG, a 3-slice TIFF volume; a tiny colour backbone."""
    from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
    from textdiff.data.studies import write_reports
    from textdiff.data.tiling import TILING_FILE

    root = tmp_path_factory.mktemp("real")
    studies, rng = root / "studies", np.random.default_rng(0)
    (studies / "labels" / "final").mkdir(parents=True)
    for n in range(6):
        tile, mask = _tile(rng, 4 * n)
        Image.fromarray(tile).save(studies / f"tile_{n}.tif")
        if n < 4:
            Image.fromarray(mask).save(studies / "labels" / "final" / f"tile_{n}.png")
    Image.fromarray((rng.random((50, 60)) * 60000).astype(np.uint16)).save(studies / "grey16.png")
    frames = [Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)) for _ in range(3)]
    frames[0].save(studies / "stack.tif", save_all=True, append_images=frames[1:])
    names = {f"tile_{n}": f"tile_{n}.tif" for n in range(6)}
    write_reports(studies, {key: (REPORT, None) for key in names}, names)
    backbone = root / "model" / "backbones" / "colour"
    cfg = h.tiny_backbone(in_channels=3, max_windows=None)
    save_diffusion(build_unet(cfg), build_scheduler(cfg), backbone, {TILING_FILE: json.dumps({"max_windows": 4})})
    conf = {"model_dir": str(root / "model"), "demo_weights": "false", "epochs": "2", "image_size": "32",
            "backbone": str(backbone), "labels": "nucleus, stroma", "healthy_label": ""}
    return {"studies": studies, "model_dir": root / "model", "conf": conf}


@pytest.fixture(scope="module")
def client(deployment):
    with in_process_client(deployment) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def trained(client):
    """The head trained once over REST, for every test that segments."""
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 2})
    assert response.status_code == 200, response.text
    return client


def _mask(response, suffix: str) -> np.ndarray:
    path = Path(f"/tmp/textdiff-real-{id(response)}{suffix}")
    path.write_bytes(response.content)
    try:
        return itk.array_from_image(itk.imread(str(path)))
    finally:
        path.unlink()


def test_named_classes_are_trained_and_served(client, trained):
    assert client.get("/info/").json()["labels"] == list(LABELS)
    info = client.get("/info/").json()
    assert info["models"]["textdiff"]["labels"] == LABELS
    response = client.post("/infer/textdiff?image=tile_0&output=image",
                           data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})})
    assert response.status_code == 200, response.text
    mask = _mask(response, ".nrrd")
    assert mask.shape[-2:] == (56, 72) and set(np.unique(mask)) <= {0, 1, 2}  # the tile's own grid, 3 classes
    result = client.post("/infer/textdiff?image=tile_5&output=json").json()
    assert result["label_names"] == LABELS
    assert set(result["label_colors"]) == set(LABELS) and result["label_colors"]["nucleus"] != result["label_colors"]["stroma"]


def test_a_sixteen_bit_png_and_a_tiff_volume_are_segmented(client, trained):
    grey = client.post("/infer/textdiff?image=grey16&output=image",
                       data={"params": json.dumps({"result_extension": ".png"})})
    assert grey.status_code == 200, grey.text
    assert Image.open(io.BytesIO(grey.content)).size == (60, 50)
    volume = client.post("/infer/textdiff?image=stack&output=image")  # default: NRRD for a volume
    assert volume.status_code == 200, volume.text
    assert _mask(volume, ".nrrd").shape == (3, 40, 48)


def test_labels_of_the_third_class_are_accepted_and_unknown_ones_refused(client, deployment):
    for value, status in ((2, 200), (3, 422)):
        buffer = io.BytesIO()
        Image.fromarray(np.full((56, 72), value, np.uint8)).save(buffer, format="PNG")
        response = client.put("/datastore/label?image=tile_5&tag=final",
                              files={"label": ("tile_5.png", buffer.getvalue(), "image/png")})
        assert response.status_code == status, response.text
    assert client.delete("/datastore/label?id=tile_5&tag=final").status_code == 200


def test_the_volume_is_scored_and_offered_by_active_learning(client, trained):
    scored = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert scored.status_code == 200, scored.text
    for key in ("tile_4", "tile_5", "grey16", "stack"):
        assert 0.0 <= client.get(f"/datastore/image/info?image={key}").json()["textdiff_uncertainty"] <= 1.0, key
    picks = set()
    for _ in range(4):  # diverse hands out each unlabeled image once, the volume included
        picks.add(client.post("/activelearning/diverse").json().get("id"))
    assert picks == {"tile_4", "tile_5", "grey16", "stack"}


def test_a_model_of_other_classes_is_not_served_under_new_names(trained, deployment):
    from lib.configs.textdiff import TextDiffTaskConfig

    from app_fixtures import APP_DIR

    config = TextDiffTaskConfig()
    with pytest.raises(ValueError, match=r"segments \['nucleus', 'stroma'\], not the configured labels \['gland'\]"):
        config.init("textdiff", str(deployment["model_dir"]), {**deployment["conf"], "labels": "gland"}, None,
                    app_dir=str(APP_DIR))


def test_the_served_mask_equals_the_librarys_for_the_same_weights(client, trained, deployment):
    """What the REST loop measures on MoNuSeg: infer over REST and `textdiff predict` agree pixel for pixel."""
    from textdiff.data.studies import read_image
    from textdiff.inference import segment_image
    from textdiff.model.segmenter import load_checkpoint

    response = client.post("/infer/textdiff?image=tile_4&output=image",
                           data={"params": json.dumps({"result_extension": ".png"})})
    assert response.status_code == 200, response.text
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    model = load_checkpoint(deployment["model_dir"] / "textdiff.pt")
    library = segment_image(model, read_image(deployment["studies"] / "tile_4.tif", "image"), REPORT)
    assert np.array_equal(served.T, library[0].numpy())
