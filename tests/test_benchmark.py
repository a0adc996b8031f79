"""`textdiff-bench benchmark`: a run does not depend on what ran before it in the same process (methods or seeds);
healthy images; `textdiff-bench benchmark-compare`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import textdiff_bench.benchmark as benchmark


def test_a_runs_initial_head_does_not_depend_on_the_methods_before_it(sample_dir, h, tmp_path, monkeypatch):
    real_train_head = benchmark.train_head
    initial_heads = []

    def recording_train_head(model, *args, **kwargs):
        initial_heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
        return real_train_head(model, *args, **kwargs)

    monkeypatch.setattr(benchmark, "train_head", recording_train_head)
    for out, methods in (("alone", ("textdiff",)), ("after", ("unet", "empty_text", "textdiff"))):
        settings = benchmark.BenchmarkSettings(label_counts=(3,), seeds=(1,), steps=1, methods=methods)
        benchmark.run_benchmark(sample_dir, None, tmp_path / out, settings, h.tiny_config())
    # the textdiff runs: the first call, and the last call before the timing runs of the second benchmark
    alone, after = initial_heads[0], initial_heads[-3]
    assert alone.keys() == after.keys()
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    # every row, UNet included, keeps the area oracle, which can only fix errors
    rows = json.loads((tmp_path / "after" / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"unet", "empty_text", "textdiff"}
    for row in rows:
        oracle = row["area_oracle"]
        assert oracle["dice"] >= row["dice"] and oracle["per_image_dice"].keys() == row["per_image_dice"].keys()
        assert 0 <= oracle["missed_areas"] <= oracle["areas"] and oracle["false_areas"] >= 0


def test_a_seeds_trained_head_does_not_depend_on_the_seeds_before_it(sample_dir, h, tmp_path, monkeypatch):
    """`--seeds 0 1` and `--seeds 1` train the same seed-1 head bit for bit: the feature cache is filled in other
    batches, so this holds only because an image's features do not depend on its batch."""
    real_train_head = benchmark.train_head
    trained_heads = []

    def recording_train_head(model, *args, **kwargs):
        result = real_train_head(model, *args, **kwargs)
        trained_heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
        return result

    monkeypatch.setattr(benchmark, "train_head", recording_train_head)
    monkeypatch.setattr(benchmark, "_timings", lambda *args, **kwargs: {})
    for out, seeds in (("alone", (1,)), ("after", (0, 1))):
        settings = benchmark.BenchmarkSettings(label_counts=(3,), seeds=seeds, steps=4, methods=("textdiff",))
        benchmark.run_benchmark(sample_dir, None, tmp_path / out, settings, h.tiny_config())
    alone, after = trained_heads[0], trained_heads[2]
    assert all(torch.equal(alone[k], after[k]) for k in alone)
    assert not all(torch.equal(trained_heads[1][k], after[k]) for k in alone)  # seed 0 trained another head


def test_runs_done_before_a_crash_are_kept(sample_dir, h, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(benchmark, "_timings", crash)  # the last step, after every run
    settings = benchmark.BenchmarkSettings(label_counts=(3,), seeds=(0, 1), steps=1, methods=("unet",))
    with pytest.raises(RuntimeError):
        benchmark.run_benchmark(sample_dir, None, tmp_path / "out", settings, h.tiny_config())
    kept = json.loads((tmp_path / "out" / "results.json").read_text())
    assert kept["partial"] and [(r["method"], r["seed"]) for r in kept["rows"]] == [("unet", 0), ("unet", 1)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json"]


def test_healthy_label_adds_the_pools_healthy_images_with_empty_masks(sample_dir, h, tmp_path, monkeypatch):
    from textdiff.data.studies import read_studies

    real_train_head = benchmark.train_head
    train_splits = []

    def recording_train_head(model, train, *args, **kwargs):
        train_splits.append(train)
        return real_train_head(model, train, *args, **kwargs)

    monkeypatch.setattr(benchmark, "train_head", recording_train_head)
    healthy = {c.id for c in read_studies(sample_dir / "train") if c.image_label == "normal"}
    runs = {}
    for name, label in (("plain", None), ("healthy", "normal")):
        train_splits.clear()
        settings = benchmark.BenchmarkSettings(label_counts=(2,), seeds=(0,), steps=1, methods=("textdiff",))
        cfg = h.tiny_config()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, healthy_label=label))
        benchmark.run_benchmark(sample_dir, None, tmp_path / name, settings, cfg)
        runs[name] = train_splits[0]
    drawn = {it["id"] for it in runs["plain"]}
    added = [it for it in runs["healthy"] if it["id"] not in drawn]
    assert healthy - drawn and {it["id"] for it in added} == healthy - drawn
    assert all(it["label"].sum() == 0 for it in added)


def _results(folder, method: str, dice_by_seed: dict[int, dict[str, float]], oracle: dict | None = None):
    folder.mkdir(parents=True)
    rows = [{"method": method, "labels": 10, "seed": seed, "dice": sum(d.values()) / len(d), "per_image_dice": d,
             **({"area_oracle": oracle} if oracle else {})} for seed, d in dice_by_seed.items()]
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_benchmark_compare_pairs_runs_by_seed_and_groups_test_images(tmp_path, capsys):
    from textdiff_bench.cli import main
    from textdiff.data.studies import read_studies

    sample_dir = Path(__file__).resolve().parents[1] / "sample-data"  # its test split has normal images
    labels = {c.id: c.image_label for c in read_studies(sample_dir / "test")}
    normal = {i for i, g in labels.items() if g == "normal"}
    assert normal and set(labels) - normal
    # a: perfect on normal images in both seeds; b: misses them in seed 1; the same on infected images
    a = _results(tmp_path / "a", "textdiff", {s: {i: 1.0 if i in normal else 0.5 for i in labels} for s in (0, 1)})
    b = _results(tmp_path / "b", "empty_text", {0: {i: 1.0 if i in normal else 0.5 for i in labels},
                                                1: {i: 0.0 if i in normal else 0.5 for i in labels},
                                                2: {i: 0.3 for i in labels}})  # seed 2 has no partner
    out = tmp_path / "cmp"
    assert main(["benchmark-compare", "--a", str(a), "--b", str(b), "--data", str(sample_dir), "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert [p["seed"] for p in result["pairs"]] == [0, 1] and result["a_better"] == 1
    assert result["pairs"][1]["difference"] == pytest.approx(len(normal) / len(labels))
    assert result["median_difference"] == pytest.approx(result["mean_difference"])  # two pairs: the middle is the mean
    assert result["groups"]["normal"] == {"images": len(normal), "a": 1.0, "b": 0.5}
    assert result["groups"]["infection"]["a"] == result["groups"]["infection"]["b"] == 0.5
    assert (out / "paired_dice.png").stat().st_size > 0 and "| normal |" in capsys.readouterr().out
    both = _results(tmp_path / "both", "unet", {0: {i: 0.1 for i in labels}})
    rows = json.loads((both / "results.json").read_text())["rows"] + json.loads((a / "results.json").read_text())["rows"]
    (both / "results.json").write_text(json.dumps({"rows": rows}))
    assert main(["benchmark-compare", "--a", str(both), "--b", str(b), "--data", str(sample_dir), "--out", str(out)]) == 2
    assert "--method-a" in capsys.readouterr().err
    assert main(["benchmark-compare", "--a", str(both), "--method-a", "unet", "--b", str(b), "--data", str(sample_dir),
                 "--out", str(out)]) == 0
    assert main(["benchmark-compare", "--a", str(tmp_path / "none"), "--b", str(b), "--data", str(sample_dir),
                 "--out", str(out)]) == 2
    assert result["area_oracle"] == {}  # runs made before the oracle existed still compare
    other = _results(tmp_path / "other-data", "textdiff", {0: {"nucleus-01": 0.8}})  # scored on another data set
    assert main(["benchmark-compare", "--a", str(other), "--b", str(other), "--data", str(sample_dir),
                 "--out", str(out)]) == 2
    assert "pass the benchmark's own --data" in capsys.readouterr().err


def test_benchmark_compare_reports_the_headroom_of_the_area_oracle(tmp_path, capsys):
    from textdiff_bench.cli import main

    from textdiff.data.studies import read_studies

    sample_dir = Path(__file__).resolve().parents[1] / "sample-data"
    images = [c.id for c in read_studies(sample_dir / "test")]
    oracle = {"dice": 0.9, "areas": 4, "missed_areas": 1, "false_areas": 2}
    a = _results(tmp_path / "a", "textdiff", {0: dict.fromkeys(images, 0.8), 1: dict.fromkeys(images, 0.6)}, oracle)
    b = _results(tmp_path / "b", "empty_text", {0: dict.fromkeys(images, 0.7), 1: dict.fromkeys(images, 0.5)}, oracle)
    out = tmp_path / "cmp"
    assert main(["benchmark-compare", "--a", str(a), "--b", str(b), "--data", str(sample_dir), "--out", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())["area_oracle"]
    assert result["b"] == {"dice": pytest.approx(0.6), "oracle_dice": 0.9, "areas": 8, "missed_areas": 2, "false_areas": 4}
    assert "| empty_text | 0.600 | 0.900 | +0.300 | 8 | 2 | 4 |" in capsys.readouterr().out


def test_benchmark_summary_merges_runs_of_separate_processes(tmp_path, capsys):
    from textdiff_bench.cli import main

    images = {"a": 1.0, "b": 0.5}
    first = _results(tmp_path / "td-0", "textdiff", {0: images})
    second = _results(tmp_path / "td-1", "textdiff", {1: {"a": 0.5, "b": 0.5}})
    unet = _results(tmp_path / "unet", "unet", {0: {"a": 0.2, "b": 0.2}, 1: {"a": 0.4, "b": 0.4}})
    out = tmp_path / "summary"
    assert main(["benchmark-summary", str(first), str(second), str(unet), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["rows"]) == 4 and set(result["runs"]) == {str(first), str(second), str(unet)}
    assert result["summary"]["textdiff"]["10"] == pytest.approx([0.625, 0.125])  # mean and sd over the two seeds
    assert result["summary"]["unet"]["10"] == pytest.approx([0.3, 0.1])
    printed = capsys.readouterr().out
    assert "seeds: [0, 1]" in printed and "| TextDiff (pretrained backbone + report) | 0.625 ± 0.125 |" in printed
    assert (out / "dice_vs_labels.png").stat().st_size > 0
    # a method with fewer seeds than the others says so in its cell
    assert main(["benchmark-summary", str(first), str(unet), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| TextDiff (pretrained backbone + report) | 0.750 ± 0.000 (1 seed) |" in printed
    assert "| MONAI UNet from scratch | 0.300 ± 0.100 |" in printed
    # a run found in two folders, or runs on different backbones, are refused
    again = _results(tmp_path / "td-0-again", "textdiff", {0: images})
    assert main(["benchmark-summary", str(first), str(again), "--out", str(out)]) == 2
    assert "seed 0 is in both" in capsys.readouterr().err
    other = json.loads((second / "results.json").read_text())
    (second / "results.json").write_text(json.dumps(dict(other, backbone="elsewhere")))
    assert main(["benchmark-summary", str(first), str(second), "--out", str(out)]) == 2
    assert "different backbones" in capsys.readouterr().err


def test_an_imported_colour_set_benchmarks_through_windows(tmp_path, h):
    """A set imported with final labels (no train-groundtruth/), colour tiles larger than the window: every method
    trains on windows and is scored on the tiles' own grids, Dice and IoU."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        (tmp_path / "set" / split / "labels" / "final").mkdir(parents=True)
        for n in range(count):
            mask = np.zeros((40, 50), np.uint8)
            mask[5 + 3 * n : 20 + 3 * n, 8:30] = 1
            tile = np.clip(np.array([[230, 200, 220], [90, 40, 140]], np.uint8)[mask] + rng.normal(0, 10, (40, 50, 3)),
                           0, 255).astype(np.uint8)
            Image.fromarray(tile).save(tmp_path / "set" / split / f"{split}_{n}.tif")
            Image.fromarray(mask).save(tmp_path / "set" / split / "labels" / "final" / f"{split}_{n}.png")
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, in_channels=3, max_windows=4))
    settings = benchmark.BenchmarkSettings(label_counts=(4,), seeds=(0,), steps=2, methods=("textdiff", "unet"),
                                           timing=False)
    result = benchmark.run_benchmark(tmp_path / "set", None, tmp_path / "out", settings, cfg)
    assert {row["method"] for row in result["rows"]} == {"textdiff", "unet"}
    for row in result["rows"]:
        assert set(row["per_image_dice"]) == {"test_0", "test_1"}
        assert 0 <= row["iou"] <= row["dice"] <= 1
    assert (tmp_path / "out" / "dice_vs_labels.png").is_file()


def test_benchmark_summary_applies_the_gate_to_runs_with_and_without_synthetic_copies_from_two_processes(tmp_path):
    from textdiff_bench.cli import main

    plain = _results(tmp_path / "plain", "textdiff", {0: {"a": 0.8}, 1: {"a": 0.6}})
    synthetic = _results(tmp_path / "synthetic", "textdiff_synthetic", {0: {"a": 0.7}, 1: {"a": 0.9}})
    for folder, val in ((plain, {0: 0.9, 1: 0.5}), (synthetic, {0: 0.8, 1: 0.7})):
        run = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps({"rows": [dict(r, val_dice=val[r["seed"]]) for r in run["rows"]]}))
    out = tmp_path / "summary"
    assert main(["benchmark-summary", str(plain), str(synthetic), "--out", str(out)]) == 0
    gated = {r["seed"]: r for r in json.loads((out / "results.json").read_text())["rows"] if r["method"] == "textdiff_synthetic_gated"}
    assert gated[0]["kept"] == "textdiff" and gated[0]["dice"] == 0.8  # the higher validation Dice is kept
    assert gated[1]["kept"] == "textdiff_synthetic" and gated[1]["dice"] == 0.9


def test_with_intensity_copies_the_unet_trains_on_the_same_windows_and_copies_as_textdiff(sample_dir, h, tmp_path,
                                                                                        monkeypatch):
    from textdiff.training.options.intensity import training_windows

    seen = {}
    real_unet, real_head = benchmark._train_unet, benchmark.train_head

    def recording_unet(train, val, epochs, *args, **kwargs):
        seen["unet"] = ([w["id"] for w in train], epochs)
        return real_unet(train, val, epochs, *args, **kwargs)

    def recording_head(model, train, val, cfg, *args, **kwargs):
        seen["textdiff"] = ([w["id"] for w in training_windows(train, model.image_size, cfg)], cfg.epochs)
        return real_head(model, train, val, cfg, *args, **kwargs)

    monkeypatch.setattr(benchmark, "_train_unet", recording_unet)
    monkeypatch.setattr(benchmark, "train_head", recording_head)
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, intensity_copies=2))
    settings = benchmark.BenchmarkSettings(label_counts=(3,), seeds=(0,), steps=6, methods=("textdiff", "unet"),
                                           timing=False)
    benchmark.run_benchmark(sample_dir, None, tmp_path / "out", settings, cfg)
    assert seen["unet"] == seen["textdiff"]
    ids, epochs = seen["unet"]
    originals = [i for i in ids if "~" not in i]
    assert len(ids) == 3 * len(originals) == 9  # the copies count in the steps: 6 steps at 5 batches of 2 an epoch
    assert epochs == 2
