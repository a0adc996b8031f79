"""The `textdiff` command line: exit codes, error messages and a tiny end-to-end run."""

import functools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from textdiff import cli
from textdiff.data import sample_data
from textdiff.cli import main
from textdiff_bench import cli as bench_cli

TINY_SET = [
    "backbone.image_size=32", "backbone.block_out_channels=[8,16]",
    'backbone.down_block_types=["DownBlock2D","DownBlock2D"]', 'backbone.up_block_types=["UpBlock2D","UpBlock2D"]',
    "backbone.timesteps=[10,50,100]", 'backbone.feature_layers=["up_blocks.0.resnets.1","up_blocks.1.resnets.1"]',
    "backbone.max_windows=1",
]
TINY_HEAD = ["head.dim=16", "head.heads=2", "head.head_channels=[8]", "text.max_tokens=16", "train.batch_size=2"]


def test_make_sample_data_command(tmp_path, monkeypatch, capsys):
    # the command writes 256² images; shrink them so the test stays fast
    monkeypatch.setattr(sample_data, "make_sample_data", functools.partial(sample_data.make_sample_data, size=64))
    assert main(["make-sample-data", "--out", str(tmp_path / "sd"), "--seed", "3", "--train", "3", "--test", "1",
                 "--labeled", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == 3 and summary["test"] == 1 and summary["labeled"] == 2
    assert len(list((tmp_path / "sd" / "train").glob("*.png"))) == 3
    assert (tmp_path / "sd" / "test" / "reports.csv").is_file()
    assert len(list((tmp_path / "sd" / "train" / "labels" / "final").glob("*.png"))) == 2
    assert "Opacity peak density" not in (tmp_path / "sd" / "README.md").read_text()
    # fainter opacities: the same layout, the range recorded in the data's README
    assert main(["make-sample-data", "--out", str(tmp_path / "faint"), "--seed", "3", "--train", "3", "--test", "1",
                 "--labeled", "2", "--opacity", "0.2", "0.3"]) == 0
    assert "Opacity peak density in [0.2, 0.3]" in (tmp_path / "faint" / "README.md").read_text()


def test_train_without_labeled_images_exits_2(tmp_path, h, capsys):
    h.random_png(tmp_path / "data" / "a.png", 40, 40)
    code = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "m.pt"), "--device", "cpu",
                 "--set", *TINY_SET, *TINY_HEAD])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("textdiff train: error:") and "labels/final" in err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "--data", "{tmp}"],
    ["predict", "--images", "{tmp}", "--out", "{tmp}/out"],
])
def test_missing_model_exits_2(tmp_path, capsys, command):
    argv = [a.format(tmp=tmp_path) for a in command] + ["--model", str(tmp_path / "nope.pt"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"textdiff {command[0]}: error:" in err and "nope.pt" in err


def test_unknown_setting_exits_2(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--set", "train.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_set_syntax_exits_2(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--set", "train.epochs"]) == 2
    assert "section.name=value" in capsys.readouterr().err


def test_import_lvit_command(tmp_path, h, capsys):
    import numpy as np

    h.random_png(tmp_path / "img" / "img_1.png", 16, 16)
    h.write_png(tmp_path / "gt" / "mask_img_1.png", np.full((16, 16), 255, np.uint8))
    (tmp_path / "t.csv").write_text("Image,Description\nother.png,x\n")
    argv = ["import-lvit", "--images", str(tmp_path / "img"), "--masks", str(tmp_path / "gt"),
            "--text", str(tmp_path / "t.csv"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--allow-missing-reports" in capsys.readouterr().err
    assert main([*argv, "--allow-missing-reports"]) == 0
    assert "imported 1 images" in capsys.readouterr().out


def test_parse_set_values():
    assert cli.parse_set(["train.epochs=3", "backbone.timesteps=[1,2]", "text.encoder=some/model", "a.b=x=y"]) == {
        "train.epochs": 3, "backbone.timesteps": [1, 2], "text.encoder": "some/model", "a.b": "x=y"}


def test_repeated_set_options_add_up():
    """`--set a --set b` keeps both (argparse would otherwise keep only the last)."""
    for parser, command in ((cli, "train"), (bench_cli, "benchmark"), (cli, "pretrain")):
        args = parser.build_parser().parse_args([command, "--data", "d", "--out", "o", "--set", "train.epochs=3",
                                                 "--set", "head.gated_text=true", "train.lr=0.01"])
        assert cli.parse_set(args.set) == {"train.epochs": 3, "head.gated_text": True, "train.lr": 0.01}


def test_each_command_turns_its_own_options_into_a_config():
    """A command's options never land in another's setting (time-to-model's --head-steps is not train's --steps)."""
    parse = cli.build_parser().parse_args
    assert cli.config_from_args(parse(["train", "--data", "d", "--out", "o", "--steps", "7"])).train.steps == 7
    assert cli.config_from_args(parse(["train", "--data", "d", "--out", "o", "--epochs", "2"])).train.epochs == 2
    for argv in (["time-to-model", "--data", "d", "--out", "o", "--head-steps", "10", "20"], ["profile", "--data", "d"],
                 ["benchmark", "--steps", "50"]):
        assert cli.config_from_args(bench_cli.build_parser().parse_args(argv)).train == cli.TextDiffConfig().train, argv


def test_end_to_end_pretrain_train_predict_evaluate(sample_dir, tmp_path, capsys):
    backbone = tmp_path / "backbone"
    assert main(["pretrain", "--data", str(sample_dir / "train"), "--out", str(backbone), "--epochs", "1",
                 "--batch-size", "8", "--set", *TINY_SET]) == 0
    assert (backbone / "unet").is_dir() and (backbone / "history.json").is_file()

    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(sample_dir / "train"), "--out", str(model), "--backbone", str(backbone),
                 "--epochs", "2", "--device", "cpu", "--set", *TINY_SET, *TINY_HEAD]) == 0
    out = capsys.readouterr().out
    assert "kept round 2 of 2" in out
    assert "a longer run" not in out  # two passes read every training window
    assert model.is_file() and model.with_suffix(".png").is_file()
    state = torch.load(model, weights_only=True)
    assert state["config"]["backbone"]["pretrained"] == "backbone"  # stored relative to the checkpoint
    assert state["config"]["train"]["epochs"] == 2

    masks = tmp_path / "masks"
    assert main(["predict", "--model", str(model), "--images", str(sample_dir / "test"), "--out", str(masks),
                 "--device", "cpu"]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 3
    for i in (6, 7, 8):
        mask = Image.open(masks / f"case_{i:04d}.png")
        assert mask.size == (64, 64)
        assert Image.open(masks / f"case_{i:04d}_overlay.png").size == (64, 64)

    # a single image file with a report given on the command line
    assert main(["predict", "--model", str(model), "--images", str(sample_dir / "test" / "case_0006.png"),
                 "--out", str(tmp_path / "one"), "--text", "No pulmonary infection.", "--device", "cpu"]) == 0
    assert (tmp_path / "one" / "case_0006.png").is_file()
    capsys.readouterr()

    scores_file = tmp_path / "scores.json"
    assert main(["evaluate", "--model", str(model), "--data", str(sample_dir / "test"), "--out", str(scores_file),
                 "--device", "cpu"]) == 0
    mean = json.loads(capsys.readouterr().out)
    scores = json.loads(scores_file.read_text())
    assert scores["mean"] == mean
    assert [row["image"] for row in scores["images"]] == ["case_0006", "case_0007", "case_0008"]
    assert all(0.0 <= row["dice"] <= 1.0 and 0.0 <= row["iou"] <= 1.0 for row in scores["images"])


def test_a_feature_cache_spares_the_next_run_the_backbone_and_gives_the_same_model(sample_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    from textdiff.model import features

    computed, compute = [], features.FeatureCache._compute
    monkeypatch.setattr(features.FeatureCache, "_compute",
                        lambda self, images, reports: computed.append(len(images)) or compute(self, images, reports))
    argv = ["train", "--data", str(sample_dir / "train"), "--epochs", "1", "--device", "cpu",
            "--feature-cache", str(tmp_path / "features"), "--set", *TINY_SET, *TINY_HEAD]
    assert main([*argv, "--out", str(tmp_path / "first.pt")]) == 0
    assert sum(computed) > 0 and any((tmp_path / "features").rglob("*.pt"))
    computed.clear()
    assert main([*argv, "--out", str(tmp_path / "again.pt")]) == 0
    assert computed == []  # every window read back from the folder
    first, again = (torch.load(tmp_path / name, weights_only=True)["head"] for name in ("first.pt", "again.pt"))
    assert all(torch.equal(first[key], again[key]) for key in first)
    capsys.readouterr()


def test_cdm_train_predict_and_pseudo_labels_from_the_command_line(sample_dir, tmp_path, capsys):
    import itk
    import numpy as np

    cdm = tmp_path / "cdm"
    assert main(["cdm-train", "--data", str(sample_dir / "train"), "--out", str(cdm), "--epochs", "1",
                 "--batch-size", "4", "--init", str(_tiny_backbone(tmp_path)), "--set", "cdm.noise_level=100",
                 "cdm.ddim_steps=5"]) == 0
    assert "CDM written" in capsys.readouterr().out and (cdm / "cdm.json").is_file()
    assert (tmp_path / "cdm-maps" / "epoch-0001.png").is_file()  # next to the model, which is replaced at each save

    masks = tmp_path / "cdm-masks"
    assert main(["cdm-predict", "--model", str(cdm), "--images", str(sample_dir / "train"), "--out", str(masks),
                 "--device", "cpu", "--set", "cdm.tau=0.9"]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 6
    for case in ("case_0000", "case_0001"):  # normal (empty mask) and infected
        assert Image.open(masks / f"{case}.png").size == (64, 64)
        soft = itk.array_from_image(itk.imread(str(masks / "soft" / f"{case}.nrrd")))
        assert soft.dtype == np.float32 and soft.shape == (64, 64)
        assert (masks / "soft" / f"{case}_heatmap.png").is_file()
    assert np.asarray(Image.open(masks / "case_0000.png")).max() == 0
    assert np.asarray(Image.open(masks / "case_0001.png")).max() == 1
    assert main(["cdm-predict", "--model", str(cdm), "--images", str(sample_dir / "train"), "--out", str(masks),
                 "--set", "train.epochs=3"]) == 2
    assert "not cdm.<name>" in capsys.readouterr().err

    model = tmp_path / "model.pt"
    capsys.readouterr()
    assert main(["train", "--data", str(sample_dir / "train"), "--out", str(model), "--pseudo-labels", str(masks),
                 "--epochs", "1", "--device", "cpu", "--compare-without", "--set", *TINY_SET, *TINY_HEAD]) == 0
    assert model.is_file()
    assert "kept the run with" in capsys.readouterr().out  # says which run it kept, with both Dice values
    assert main(["train", "--data", str(sample_dir / "train"), "--out", str(model), "--pseudo-labels",
                 str(tmp_path / "missing"), "--epochs", "1", "--set", *TINY_SET, *TINY_HEAD]) == 2
    assert "does not exist" in capsys.readouterr().err


def _tiny_backbone(tmp_path):
    from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
    from textdiff.config import with_overrides, TextDiffConfig

    cfg = with_overrides(TextDiffConfig(), cli.parse_set(TINY_SET)).backbone
    return save_diffusion(build_unet(cfg), build_scheduler(cfg), tmp_path / "tiny-backbone")


def test_synth_train_synthesize_and_train_with_synthetic_pairs(sample_dir, tmp_path, capsys):
    tiny_synth = ["synth.image_size=32", "synth.block_out_channels=[8,16]", "synth.attention_head_dim=4",
                  'synth.down_block_types=["DownBlock2D","CrossAttnDownBlock2D"]',
                  'synth.up_block_types=["CrossAttnUpBlock2D","UpBlock2D"]']
    model = tmp_path / "synth"
    assert main(["synth-train", "--data", str(sample_dir / "train"), "--out", str(model), "--epochs", "1",
                 "--batch-size", "4", "--set", *tiny_synth]) == 0
    assert "EMIT-Diff model written" in capsys.readouterr().out and (model / "synth.json").is_file()
    assert main(["synth-train", "--data", str(sample_dir / "train"), "--out", str(model), "--set", "train.epochs=1"]) == 2
    assert "not synth.<name>" in capsys.readouterr().err

    pairs = tmp_path / "pairs"
    assert main(["synthesize", "--model", str(model), "--data", str(sample_dir / "train"), "--masks",
                 str(sample_dir / "train-groundtruth"), "--out", str(pairs), "--per-image", "1", "--steps", "2",
                 "--device", "cpu"]) == 0
    assert "6 synthetic pairs of 6 labeled images" in capsys.readouterr().out  # every ground-truth mask is used
    assert (pairs / "contact_sheet.png").is_file() and len(list((pairs / "images").iterdir())) == 6
    assert main(["synthesize", "--model", str(model), "--data", str(sample_dir / "train"), "--out",
                 str(sample_dir / "train"), "--device", "cpu"]) == 2
    assert "studies folder" in capsys.readouterr().err

    out = tmp_path / "model.pt"
    assert main(["train", "--data", str(sample_dir / "train"), "--out", str(out), "--synthetic", str(pairs),
                 "--synthetic-ratio", "1", "--epochs", "1", "--device", "cpu", "--set", *TINY_SET, *TINY_HEAD]) == 0
    assert out.is_file()
    assert main(["train", "--data", str(sample_dir / "train"), "--out", str(out), "--synthetic", str(sample_dir / "train"),
                 "--epochs", "1", "--device", "cpu", "--set", *TINY_SET, *TINY_HEAD]) == 2
    assert "SYNTHETIC.json" in capsys.readouterr().err


def _colour_tiff_study(folder: Path, count: int = 4) -> Path:
    """H&E-like colour TIFF tiles larger than the tiny window, with 3-class masks (background, nucleus, stroma)."""
    import numpy as np

    rng = np.random.default_rng(0)
    (folder / "labels" / "final").mkdir(parents=True)
    for n in range(count):
        mask = np.zeros((56, 72), np.uint8)  # (rows, columns)
        mask[:, 36:] = 2
        mask[8 + 4 * n : 24 + 4 * n, 10:30] = 1
        colours = np.array([[235, 200, 220], [90, 40, 140], [220, 120, 170]], np.uint8)
        tile = np.clip(colours[mask] + rng.normal(0, 12, (56, 72, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(tile).save(folder / f"tile_{n}.tif")
        Image.fromarray(mask).save(folder / "labels" / "final" / f"tile_{n}.png")
    return folder


def test_colour_tiff_study_with_three_named_classes_end_to_end(tmp_path, capsys):
    import numpy as np

    studies = _colour_tiff_study(tmp_path / "studies")
    windows = [s for s in TINY_SET if not s.startswith("backbone.max_windows")]  # 72x56 tiles: 32² windows
    backbone = tmp_path / "backbone"
    assert main(["pretrain", "--data", str(studies), "--out", str(backbone), "--epochs", "1", "--batch-size", "4",
                 "--set", *windows]) == 0
    assert json.loads((backbone / "unet" / "config.json").read_text())["in_channels"] == 3  # colour data, colour UNet
    assert json.loads((backbone / "tiling.json").read_text()) == {"patch_scale": None, "max_windows": 4.0}
    model = tmp_path / "model.pt"
    assert main(["train", "--data", str(studies), "--out", str(model), "--backbone", str(backbone), "--epochs", "2",
                 "--device", "cpu", "--set", *windows, *TINY_HEAD, "head.label_names=[background,nucleus,stroma]",
                 "train.val_fraction=0"]) == 0
    state = torch.load(model, weights_only=True)
    assert state["config"]["head"]["label_names"] == ("background", "nucleus", "stroma")
    assert state["config"]["backbone"]["max_windows"] == 4.0 and state["config"]["backbone"]["in_channels"] == 3
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--images", str(studies / "tile_0.tif"), "--out",
                 str(tmp_path / "masks"), "--device", "cpu"]) == 0
    mask = np.asarray(Image.open(tmp_path / "masks" / "tile_0.png"))
    assert mask.shape == (56, 72) and set(np.unique(mask)) <= {0, 1, 2}
    assert Image.open(tmp_path / "masks" / "tile_0_overlay.png").mode == "RGB"
    assert main(["evaluate", "--model", str(model), "--data", str(studies), "--device", "cpu"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dice"] <= 1.0
    # a grey backbone refuses the colour tiles with a message that says what to do
    assert main(["train", "--data", str(studies), "--out", str(tmp_path / "grey.pt"), "--epochs", "1", "--device", "cpu",
                 "--set", *windows, *TINY_HEAD, "backbone.in_channels=1"]) == 2
    assert "is in colour but the backbone reads grey" in capsys.readouterr().err


def test_the_small_structures_settings_are_what_the_readme_passes_to_set():
    """The README's `--set` line for several small structures is textdiff.config.SMALL_STRUCTURES, and applies."""
    from textdiff.config import SMALL_STRUCTURES, TextDiffConfig, with_overrides

    given = cli.parse_set(["head.classifier=pixel_mlp", "head.head_channels=[128,128]", "train.dice_weight=0",
                           "train.lr=0.003", "train.steps=300"])
    assert given == SMALL_STRUCTURES
    cfg = with_overrides(TextDiffConfig(), given)
    assert (cfg.head.classifier, cfg.head.head_channels, cfg.train.dice_weight, cfg.train.steps) == \
        ("pixel_mlp", (128, 128), 0.0, 300)
