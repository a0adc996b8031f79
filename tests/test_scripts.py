"""Every script a docs page gives as a command still runs: each states its options, and the two experiment scripts
that reproduce results tables run end to end on a tiny input (a signature change in the library breaks them here).
scripts/ holds what a user runs (setup, serve, demo, PACS, viewer); benchmarks/scripts the experiments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_BACKBONE = ROOT / "apps" / "textdiff" / "demo" / "backbones" / "sample-data"


FOLDERS = (ROOT / "scripts", ROOT / "benchmarks" / "scripts")
SCRIPTS = {p.name: p for folder in FOLDERS for p in folder.glob("*.py")}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS[script]), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_states_its_options(script):
    done = _run(script, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


def test_head_variants_runs_on_a_tiny_input(sample_dir):
    variants = {"tiny": {"steps": 2, "head.dim": 16, "head.heads": 2, "head.head_channels": [8]}}
    done = _run("head_variants.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "4",
                "--variants", json.dumps(variants))
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["variant"] == "tiny" and 0 <= row["dice"] <= 1


def test_obey_report_same_weights_runs_on_a_tiny_input(sample_dir, tmp_path):
    done = _run("obey_report_same_weights.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE),
                "--labels", "4", "--steps", "2", "--out", str(tmp_path / "rows.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 1 and 0 <= rows[0]["as drawn"]["dice"] <= 1


def test_every_benchmark_command_states_its_options():
    from textdiff_bench.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        done = subprocess.run([sys.executable, "-m", "textdiff_bench.cli", name, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "usage: textdiff-bench" in done.stdout, (name, done.stderr[-2000:])


def test_publish_gate_runs_on_a_tiny_input(sample_dir, tmp_path):
    variants = {"tiny": {"train.steps": 2, "train.val_every": 2}}
    done = _run("publish_gate.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "3",
                "--seeds", "0", "--variants", json.dumps(variants), "--out", str(tmp_path / "gate.json"),
                "--set", json.dumps({"head.per_scale_entry": False, "train.steps": 2, "train.val_every": 2}))
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((tmp_path / "gate.json").read_text())
    (row,) = written["rows"]
    assert set(row["publish"]) == {"labeled", "left-out", "test"} and row["left_out_seconds"] > 0
    # the settings a documented row pins reach the model in service too
    assert written["command"]["set"] == {"head.per_scale_entry": False, "train.steps": 2, "train.val_every": 2}
    assert torch.load(tmp_path / "gate" / "service-0.pt", weights_only=True)["config"]["head"]["per_scale_entry"] is False


def test_round_choice_runs_on_a_tiny_input(sample_dir, tmp_path):
    done = _run("round_choice.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "3",
                "--seeds", "0", "--set", json.dumps({"train.steps": 4, "train.val_every": 2}),
                "--out", str(tmp_path / "rounds.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    best, last = json.loads((tmp_path / "rounds.json").read_text())["rows"]
    assert (best["checkpoint"], last["checkpoint"]) == ("best", "last") and last["round"] == last["rounds"] == 2
    assert 0 <= best["test_dice"] <= 1 and best["labeled"] == last["labeled"]


def test_feature_probe_fits_every_probe_and_scores_the_test_images(sample_dir, tmp_path):
    done = _run("feature_probe.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "3",
                "--iterations", "2", "--out", str(tmp_path / "probe.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads((tmp_path / "probe.json").read_text())
    assert [row["probe"] for row in written["rows"]] == ["MLP, every scale", "linear, every scale",
                                                        "MLP, finest scale", "MLP, pixel values"]
    # the images `textdiff-bench benchmark` draws for the seed, so a probe pairs with the head's runs
    from textdiff_bench.benchmark import _pool, _subset
    assert written["rows"][0]["labeled"] == [c.id for c in _subset(_pool(sample_dir), 3, 0)]
    for row in written["rows"]:
        for split in ("fit", "test"):
            assert 0 <= row[split]["dice"] <= 1 and len(row[split]["class_dice"]) == 1
    # drawn as the head draws (whole windows a step), unweighted
    done = _run("feature_probe.py", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "3",
                "--iterations", "2", "--probes", "MLP, every scale", "--windows-per-step", "1",
                "--class-weight-power", "0", "--out", str(tmp_path / "windows.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "windows.json").read_text())["command"]["windows_per_step"] == 1


def test_pool_folds_score_every_pool_image_once_and_train_on_the_rest(sample_dir, tmp_path):
    from textdiff.data.studies import read_studies

    done = _run("pool_folds.py", str(sample_dir / "train"), "--folds", "3", "--out", str(tmp_path / "cv"))
    assert done.returncode == 0, done.stderr[-2000:]
    pool = {case.id: case for case in read_studies(sample_dir / "train")}
    scored = []
    for fold in range(3):
        train, test = (read_studies(tmp_path / "cv" / f"fold-{fold}" / split) for split in ("train", "test"))
        train_ids, test_ids = {c.id for c in train}, {c.id for c in test}
        assert train_ids | test_ids == set(pool) and not train_ids & test_ids
        assert all(c.report == pool[c.id].report and (c.label is None) == (pool[c.id].label is None)
                   for c in train + test)
        scored += [c.id for c in test]
    assert sorted(scored) == sorted(pool)


def test_probe_recipe_head_swaps_in_what_it_is_asked_and_runs_time_to_model(sample_dir, tmp_path, monkeypatch):
    import importlib.util

    from textdiff.config import HeadConfig
    from textdiff.model import fusion
    from textdiff.training import train
    from textdiff_bench import time_to_model

    spec = importlib.util.spec_from_file_location("probe_recipe_head", SCRIPTS["probe_recipe_head.py"])
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for owner, name in ((fusion.TextDiffHead, "__init__"), (time_to_model, "train_head"), (train, "segmentation_loss")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # put back after the test
    script.patch_head({"standardise", "pixel-mlp"})
    head = fusion.TextDiffHead([8, 4], 16, HeadConfig(dim=8, heads=2), 16)
    assert isinstance(head.classifier, fusion.PixelMLPClassifier)
    assert all(isinstance(reduce[0], torch.nn.BatchNorm2d) for reduce in head.reduce)
    logits = head([torch.randn(2, 8, 8, 8), torch.randn(2, 4, 16, 16)], torch.randn(2, 3, 16), torch.ones(2, 3))
    assert logits.shape == (2, 2, 16, 16)
    # cross-entropy alone, weighted by class frequency^-0.5 over the training pixels
    loss = script.ProbeLoss(torch.tensor([0.5, 1.5]), dice=False, over_batch=False)
    labels = (torch.rand(2, 1, 16, 16) > 0.8).long()
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 0], weight=torch.tensor([0.5, 1.5]))
    assert torch.allclose(loss(logits, labels), expected)

    # a window holding the one small structure is drawn for half the slots (class 1 or background), not 1 in 10
    import random

    items = [{"id": i, "label": torch.zeros(1, 4, 4, dtype=torch.long)} for i in range(10)]
    items[3]["label"][0, 0, 0] = 1
    batches = script.class_window_batches(items, 4, random.Random(0))
    drawn = [item["id"] for _ in range(200) for item in next(batches)]
    assert 0.45 < drawn.count(3) / len(drawn) < 0.6

    done = _run("probe_recipe_head.py", "--change", "standardise", "class-weights", "no-dice", "pixel-mlp",
                "class-windows", "--",
                "time-to-model", "--data", str(sample_dir), "--backbone", str(DEMO_BACKBONE), "--labels", "3",
                "--seeds", "0", "--head-steps", "2", "--methods", "head", "--out", str(tmp_path / "ttm"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "ttm" / "results.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["TextDiff head"] and 0 <= rows[0]["dice"] <= 1
