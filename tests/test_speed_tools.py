"""`textdiff-bench profile`, `time-to-model` and `infer-speed`: the speed tools run on tiny models and say what they measured."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from textdiff.model import backbone
from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
from textdiff_bench.profile import profile_pretraining, run_profile
from textdiff_bench.time_to_model import TimeToModelSettings, run_time_to_model


def test_profile_splits_a_head_run_and_a_pretraining_epoch_into_phases(sample_dir, h, tmp_path, capsys):
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=None, steps=4, val_every=2))
    result = run_profile(sample_dir / "train", cfg, labels=3, pretrain_epochs=1, pretrain_batch_size=2,
                         out=tmp_path / "profile.json")
    head, pretraining = result["head"], result["pretraining"]
    assert head["steps"] == 4 and head["rounds"] == 2 and head["images"] == 3
    for phase in ("feature extraction (backbone)", "fusion forward (reductions, cross-attention)",
                  "classifier backward", "loss forward and backward", "optimizer step",
                  "validation (after each round), checkpoint choice"):
        assert head["seconds"][phase] > 0, phase
    assert sum(head["seconds"].values()) <= head["total_s"] * 1.05  # the phases do not count any second twice
    assert pretraining["seconds"]["UNet backward, gradient clipping"] > 0
    assert json.loads((tmp_path / "profile.json").read_text()).keys() == {"head", "pretraining"}
    printed = capsys.readouterr().out
    assert "| classifier forward (upsampling the scales, convolutions) |" in printed and "Pretraining:" in printed


def test_profile_pretraining_reads_every_window_of_an_epoch(sample_dir, h):
    result = profile_pretraining(sample_dir / "train", h.tiny_config(), epochs=2, batch_size=2)
    assert result["windows per epoch"] == 6 and result["epochs"] == 2 and result["epoch_s"] > 0


def test_time_to_model_puts_every_method_and_budget_on_one_time_axis(sample_dir, h, tmp_path, capsys):
    cfg = h.tiny_config()
    backbone = save_diffusion(build_unet(cfg.backbone), build_scheduler(cfg.backbone), tmp_path / "bb")
    settings = TimeToModelSettings(labels=3, seeds=(0,), head_steps=(1, 2), unet_steps=(1,),
                                   pretrained={0.5: str(backbone)}, unet_feature_scales=2)
    result = run_time_to_model(sample_dir, str(backbone), tmp_path / "out", settings, cfg)
    budgets = {(row["method"], row["budget"]) for row in result["rows"]}
    assert budgets == {("TextDiff head", "1 steps"), ("TextDiff head", "2 steps"),
                       ("TextDiff head, continued after a label", "1 steps"),
                       ("TextDiff head, continued after a label", "2 steps"),
                       ("TextDiff, pretraining + head", "0.5 min"), ("MONAI UNet", "1 steps"),
                       ("MONAI UNet, flips", "1 steps"), ("MONAI UNet + diffusion features, flips", "1 steps")}
    assert all(0 <= row["dice"] <= 1 and row["minutes"] > 0 for row in result["rows"])
    pretrained = next(row for row in result["rows"] if row["budget"] == "0.5 min")
    assert pretrained["minutes"] > 0.5 and pretrained["steps"] == cfg.train.steps  # the head at its default budget
    assert "cores" in result["hardware"] and (tmp_path / "out" / "dice_vs_minutes.png").is_file()
    assert "| TextDiff head | 2 steps |" in capsys.readouterr().out
    assert all(len(row["class_dice"]) == cfg.head.num_classes - 1 for row in result["rows"])


def test_time_to_model_runs_the_methods_asked_for(sample_dir, h, tmp_path, monkeypatch):
    from textdiff_bench import cli
    from textdiff_bench import time_to_model

    seen = {}
    monkeypatch.setattr(time_to_model, "run_time_to_model", lambda data, backbone, out, settings, cfg: seen.update(
        settings=settings))
    cli.main(["time-to-model", "--data", str(sample_dir), "--out", str(tmp_path), "--methods", "head", "unet-features",
              "--unet-feature-scales", "1"])
    assert seen["settings"].methods == ("head", "unet-features") and seen["settings"].unet_feature_scales == 1
    with pytest.raises(SystemExit):
        cli.main(["time-to-model", "--data", str(sample_dir), "--out", str(tmp_path), "--methods", "nothing"])
    assert set(cli.build_parser()._subparsers._group_actions[0].choices["time-to-model"]._option_string_actions[
        "--methods"].choices) == set(time_to_model.METHODS)


def test_the_mri_stand_in_centres_its_slices_on_a_scanner_field_of_view(tmp_path):
    """benchmarks/scripts/mni_tissue.py --canvas: the 256² slices of the speed page, from templates in the MNI files' layout."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    t1 = rng.integers(0, 255, (20, 24, 30)).astype(np.uint8)
    for name, volume in (("t1", t1), ("wm", (t1 > 128).astype(np.uint8) * 255)):
        nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "mni_tissue.py"
    subprocess.run([sys.executable, str(script), "--templates", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--canvas", "32", "--first", "5", "--last", "13", "--step", "2"], check=True, capture_output=True)
    image = np.asarray(Image.open(tmp_path / "out" / "train" / "mni-z005.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "train" / "labels" / "final" / "mni-z005.png"))
    assert image.shape == mask.shape == (32, 32)
    assert image[:4].max() == 0 and image[:, :6].max() == 0  # the field of view around the 24x20 slice is empty
    assert np.array_equal(image[4:28, 6:26], np.rot90(t1[:, :, 5]))
    assert sorted(p.name for p in (tmp_path / "out" / "test").glob("*.png")) == ["mni-z007.png", "mni-z011.png"]


def test_the_deep_structures_case_labels_each_side_and_the_ventricles_apart(tmp_path):
    """benchmarks/scripts/mni_tissue.py --tissue deep on a synthetic brain: a white-matter ball holding a grey nucleus on each
    side of the midline and a fluid-filled hole, as the MNI files lay them out (1 mm voxels, MNI origin at voxel 60)."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np
    from PIL import Image

    x, y, z = np.meshgrid(*(np.arange(120),) * 3, indexing="ij")
    ball = (x - 60) ** 2 + (y - 60) ** 2 + (z - 60) ** 2 < 55**2
    nuclei = ((abs(x - 60) - 14) ** 2 + (y - 55) ** 2 < 6**2) & (abs(z - 65) < 20)
    hole = (x - 60) ** 2 + (y - 40) ** 2 < 5**2
    gm, wm = nuclei & ball, ball & ~nuclei & ~hole
    affine = np.diag([1.0, 1, 1, 1])
    affine[:3, 3] = -60
    for name, volume in (("t1", ball * 200 - hole * 150), ("gm", gm * 255), ("wm", wm * 255)):
        nib.save(nib.Nifti1Image(volume.astype(np.uint8), affine),
                 tmp_path / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "mni_tissue.py"
    subprocess.run([sys.executable, str(script), "--templates", str(tmp_path), "--out", str(tmp_path / "out"),
                    "--tissue", "deep", "--first", "64", "--last", "66", "--step", "2"], check=True, capture_output=True)
    mask = np.rot90(np.asarray(Image.open(tmp_path / "out" / "train" / "labels" / "final" / "mni-z064.png")), -1)
    assert set(np.unique(mask)) == {0, 1, 2, 3}
    assert (mask[:60] == 1).sum() == (mask[60:] == 2).sum() > 50 and not (mask[60:] == 1).any()  # left is x < 60
    assert np.array_equal(mask == 3, hole[..., 64])  # the hole inside the tissue, and no fluid outside the brain


def test_the_rest_loop_script_states_its_options():
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "scripts" / "rest_loop.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert all(option in done.stdout for option in ("--add-label", "--pretrain-minutes", "--busy-infer"))


def test_infer_speed_times_each_reading_of_images_and_a_volume(make_model, sample_dir, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from textdiff_bench.cli import main
    from textdiff.model.segmenter import save_checkpoint

    checkpoint = save_checkpoint(make_model(), tmp_path / "model.pt")
    volume = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 36, 4)).astype(np.float32), np.eye(4)), volume)
    main(["infer-speed", "--model", str(checkpoint), "--data", str(sample_dir / "test"), "--volume", str(volume),
          "--volume-shape", "40", "48", "3", "--overlaps", "0.25", "0", "--side-by-side", "1", "2",
          "--out", str(tmp_path / "speed.json")])
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [row["reading"] for row in rows] == [f"{reading}, overlap {overlap}, {side} at a time" for overlap in ("0.25", "0")
                                                for side in (1, 2) for reading in ("float32", "fast")]
    assert all(row["seconds_per_image"] > 0 and 0 <= row["dice"] <= 1 and row["volume_seconds"] > 0 for row in rows)
    assert rows[0]["pixels_changed"] == 0 and "volume 40x48x3" in capsys.readouterr().out
    assert rows[2]["pixels_changed"] == 0  # two images at a time: the same masks as one at a time
    assert backbone.SIDE_BY_SIDE == 2  # the product's setting back after the benchmark


def test_backbone_speed_says_what_each_backbone_costs(h, tmp_path, capsys):
    from textdiff_bench import cli

    folder = save_diffusion(build_unet(h.tiny_backbone()), build_scheduler(h.tiny_backbone()), tmp_path / "tiny")
    assert cli.main(["backbone-speed", "--backbone", str(folder), "random:default", "--repeats", "1",
                     "--out", str(tmp_path / "speed.json")]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [row["backbone"] for row in rows] == [str(folder), "random:default"]
    assert rows[1]["parameters_m"] > rows[0]["parameters_m"] and all(row["seconds_per_image"] > 0 for row in rows)
    assert rows[1]["windows_per_image"] == 9  # a 256² image in 128² windows overlapping by a quarter
    assert "s of features a 256² image on cpu" in capsys.readouterr().out
