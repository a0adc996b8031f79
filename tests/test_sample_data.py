"""The synthetic sample data: deterministic, consistent masks and reports, documented layout."""

import csv

import numpy as np
import pytest
from PIL import Image

from textdiff.data.studies import read_studies
from textdiff.data.sample_data import make_sample_data

SMALL = dict(n_train=6, n_test=3, n_labeled=4, size=64)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_data(tmp_path):
    first = make_sample_data(tmp_path / "a", **SMALL)
    second = make_sample_data(tmp_path / "b", **SMALL)
    assert first == second
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    assert first["bytes"] == sum(len(v) for v in files_a.values())
    other = make_sample_data(tmp_path / "c", seed=1, **SMALL)
    assert _files(tmp_path / "c") != files_a
    assert other["train"] == 6


def test_layout_and_summary(sample_dir):
    names = set(_files(sample_dir))
    train = {f"case_{i:04d}.png" for i in range(6)}
    test = {f"case_{i:04d}.png" for i in range(6, 9)}
    assert {f"train/{n}" for n in train} <= names
    assert {f"test/{n}" for n in test} <= names
    assert {n for n in names if n.startswith("train/labels/final/")} == {f"train/labels/final/case_{i:04d}.png" for i in range(4)}
    assert {n for n in names if n.startswith("train-groundtruth/")} == {f"train-groundtruth/{n}" for n in train}
    assert {n for n in names if n.startswith("test/labels/final/")} == {f"test/labels/final/{n}" for n in test}
    assert {"README.md", "train/reports.csv", "test/reports.csv"} <= names
    assert not [n for n in names if "/." in n or n.startswith(".")]  # no temporary files
    cases = read_studies(sample_dir / "train")
    assert len(cases) == 6 and sum(c.label is not None for c in cases) == 4
    assert all(c.report for c in cases)


def test_masks_and_reports_agree(sample_dir):
    for split, mask_dir in (("train", "train-groundtruth"), ("test", "test/labels/final")):
        with open(sample_dir / split / "reports.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == ["image", "report", "label"]
            rows = list(reader)
        assert len(rows) == (6 if split == "train" else 3)
        for row in rows:
            image = np.asarray(Image.open(sample_dir / split / row["image"]))
            mask = np.asarray(Image.open(sample_dir / mask_dir / row["image"]))
            assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
            assert row["label"] in {"normal", "infection"}
            if row["label"] == "normal":
                assert row["report"] == "No pulmonary infection."
                assert mask.sum() == 0
            else:
                assert "pulmonary infection" in row["report"] and mask.sum() > 0
    # the labelled train masks are the ground truth ones
    for path in (sample_dir / "train" / "labels" / "final").iterdir():
        assert path.read_bytes() == (sample_dir / "train-groundtruth" / path.name).read_bytes()


def test_labeled_subset_has_normals_and_infections(sample_dir):
    cases = [c for c in read_studies(sample_dir / "train") if c.label is not None]
    labels = {c.image_label for c in cases}
    assert labels == {"normal", "infection"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_train=0), "n_train"),
    (dict(n_labeled=10, n_train=5), "n_labeled"),
    (dict(normal_fraction=1.5), "normal_fraction"),
    (dict(size=32), "size"),
    (dict(opacity=(0.0, 0.5)), "opacity"),
    (dict(opacity=(0.6, 0.3)), "opacity"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_sample_data(tmp_path, **{**SMALL, **kwargs})
    assert not any(tmp_path.iterdir())


def test_fainter_opacities_change_only_the_infected_pixels_and_keep_masks_and_reports(tmp_path):
    make_sample_data(tmp_path / "default", **SMALL)
    make_sample_data(tmp_path / "faint", opacity=(0.1, 0.2), **SMALL)
    default, faint = _files(tmp_path / "default"), _files(tmp_path / "faint")
    masks_and_reports = [k for k in default if "labels" in k or "groundtruth" in k or k.endswith(".csv")]
    assert masks_and_reports and all(default[k] == faint[k] for k in masks_and_reports)
    assert "[0.1, 0.2]" in faint["README.md"].decode()
    contrast = {}
    for name in ("default", "faint"):
        inside, outside = [], []
        for case in read_studies(tmp_path / name / "test"):
            image = np.asarray(Image.open(case.image), dtype=float)
            mask = np.asarray(Image.open(tmp_path / name / "test" / "labels" / "final" / case.image.name)) > 0
            if mask.any():
                inside.append(image[mask].mean())
                outside.append(image[~mask].mean())
        contrast[name] = np.mean(inside) - np.mean(outside)
    assert contrast["faint"] < contrast["default"]
