"""EMIT-Diff synthetic copies through the app: the textdiff trainer's `synthetic_ratio`, pairs kept out of the datastore."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from app_fixtures import in_process_client, make_deployment  # noqa: E402

TINY_SYNTH = ["synth.image_size=32", "synth.block_out_channels=[8,16]", "synth.attention_head_dim=4",
              'synth.down_block_types=["DownBlock2D","CrossAttnDownBlock2D"]',
              'synth.up_block_types=["CrossAttnUpBlock2D","UpBlock2D"]']


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, h):
    return make_deployment(tmp_path_factory.mktemp("emit-app"), h.tiny_config)


@pytest.fixture(scope="module")
def client(deployment):
    with in_process_client(deployment) as test_client:
        yield test_client


def _train(client, **params):
    return client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1, **params})


def test_synthetic_ratio_trains_on_synthetic_copies_that_never_enter_the_datastore(client, deployment, tmp_path):
    from textdiff.cli import main

    studies = deployment["studies"]
    images_before = sorted(client.get("/datastore/?output=all").json()["objects"])
    files_before = sorted(p.name for p in studies.rglob("*") if p.is_file())

    missing = _train(client, synthetic_ratio=2)
    assert missing.status_code == 422 and "textdiff synthesize" in missing.json()["detail"]
    assert _train(client, synthetic_ratio="lots").status_code == 422
    assert _train(client, synthetic_ratio=-1).status_code == 422

    synth = tmp_path / "synth"
    assert main(["synth-train", "--data", str(studies), "--out", str(synth), "--epochs", "1", "--batch-size", "4",
                 "--set", *TINY_SYNTH]) == 0
    pairs = deployment["model_dir"] / "synthetic"
    assert main(["synthesize", "--model", str(synth), "--data", str(studies), "--out", str(pairs), "--per-image", "2",
                 "--steps", "2", "--device", "cpu"]) == 0

    response = _train(client, synthetic_ratio=2)
    assert response.status_code == 200, response.text
    stats = client.get("/info/").json()["train_stats"]["textdiff"]
    assert stats["synthetic_ratio"] == 2 and stats["images_with_synthetic_copies"] == stats["labeled_images"] == 4

    images_after = sorted(client.get("/datastore/?output=all").json()["objects"])
    assert images_after == images_before and not any("_syn" in key for key in images_after)
    assert sorted(p.name for p in studies.rglob("*") if p.is_file() and p.name != "datastore_v2.json") == \
        sorted(name for name in files_before if name != "datastore_v2.json")
    assert client.post("/infer/textdiff?image=case_0000_syn00").status_code in (404, 422)  # not an image of the store
