"""`textdiff-bench`: the benchmarks behind docs/results, apart from the product's `textdiff` command. Each prints a
table and writes its results and plots: benchmark (Dice against labels), time-to-model (Dice against minutes),
profile, infer-speed, backbone-speed, al-benchmark, cdm-benchmark, and the summaries of several runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from textdiff.cli import command_line, config_from_args, model_options, pairs, parent, run, section_overrides


def cmd_benchmark(args) -> None:
    from textdiff_bench.benchmark import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(label_counts=tuple(args.labels), seeds=tuple(args.seeds), steps=args.steps,
                                 methods=tuple(args.methods), synthetic=args.synthetic,
                                 synthetic_ratio=args.synthetic_ratio, timing=not args.skip_timing)
    run_benchmark(Path(args.data), args.backbone, Path(args.out), settings, config_from_args(args))


def cmd_profile(args) -> None:
    from textdiff_bench.profile import run_profile

    run_profile(Path(args.data), config_from_args(args), args.labels, args.pretrain_epochs, args.pretrain_batch_size,
                Path(args.out) if args.out else None)


def cmd_time_to_model(args) -> None:
    from textdiff_bench.time_to_model import TimeToModelSettings, run_time_to_model

    pretrained = {float(minutes): folder for minutes, folder in pairs(args.pretrained, "--pretrained MINUTES=FOLDER")}
    settings = TimeToModelSettings(labels=args.labels, seeds=tuple(args.seeds), head_steps=tuple(args.head_steps),
                                   unet_steps=tuple(args.unet_steps), pretrained=pretrained,
                                   unet_feature_scales=args.unet_feature_scales, methods=tuple(args.methods))
    run_time_to_model(Path(args.data), args.backbone, Path(args.out), settings, config_from_args(args))


def cmd_infer_speed(args) -> None:
    from textdiff_bench.infer_speed import Reading, run_infer_speed

    readings = [Reading(fast, overlap, side) for overlap in args.overlaps for side in args.side_by_side
                for fast in (False, True)]
    run_infer_speed(Path(args.model), [Path(d) for d in args.data], readings, Path(args.volume) if args.volume else None,
                    tuple(args.volume_shape), Path(args.out) if args.out else None)


def cmd_benchmark_compare(args) -> None:
    from textdiff_bench.compare import run_comparison

    run_comparison(args.a, args.b, Path(args.data), Path(args.out), args.method_a, args.method_b)


def cmd_benchmark_summary(args) -> None:
    from textdiff_bench.benchmark import merge_runs

    references = {name: float(value) for name, value in pairs(args.reference, "--reference NAME=VALUE", last=True)}
    merge_runs(args.results, Path(args.out), args.title, references)


def cmd_cdm_benchmark(args) -> None:
    from textdiff_bench.cdm_benchmark import CDMBenchmarkSettings, run_cdm_benchmark
    from textdiff_bench.gradcam import ClassifierSettings

    settings = CDMBenchmarkSettings(real_masks=args.real_masks, seeds=tuple(args.seeds), steps=args.steps,
                                    choose_readout=args.choose_readout,
                                    classifier=ClassifierSettings(epochs=args.classifier_epochs))
    run_cdm_benchmark(Path(args.data), args.cdm, args.backbone, Path(args.out), settings, config_from_args(args),
                      section_overrides(args, "cdm", only=False))


def cmd_al_benchmark(args) -> None:
    from textdiff_bench.al_benchmark import LabelingSettings, run_labeling_benchmark

    settings = LabelingSettings(start=args.start, step=args.step, rounds=args.rounds, seeds=tuple(args.seeds),
                                steps=args.steps, strategies=tuple(args.strategies), continued=args.continued,
                                gate=args.gate, left_out_runs=args.left_out_runs)
    run_labeling_benchmark(Path(args.data), args.backbone, Path(args.out), settings, config_from_args(args))


def cmd_al_summary(args) -> None:
    from textdiff_bench.al_benchmark import summarise_labeling

    rows = [row for folder in args.results for row in json.loads((Path(folder) / "al_results.json").read_text())["rows"]]
    summarise_labeling(rows, Path(args.out))


def cmd_backbone_speed(args) -> None:
    from textdiff_bench.backbone_speed import run_backbone_speed

    run_backbone_speed(args.backbone, Path(args.out) if args.out else None, args.repeats, args.device)


def _benchmark_commands(command) -> None:
    """Dice against the number of labeled images."""
    model = parent(model_options)
    p = command("benchmark", cmd_benchmark, "Dice vs number of labeled images for TextDiff, its ablations and a UNet",
                [model])
    p.add_argument("--data", default="sample-data")
    p.add_argument("--out", default="benchmark-results")
    p.add_argument("--labels", nargs="+", type=int, default=[5, 10, 20], help="label counts (the pool has 70: add 70 for all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=["textdiff", "empty_text", "no_cross_attention", "unet", "random_backbone"],
                   help="also textdiff_synthetic and unet_synthetic (these need --synthetic)")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the same for every method, in whole passes "
                   "over the training windows, each ended by validation (the results pages' recipe); default: TextDiff "
                   "trains as the product does (train.steps) and the UNet 400 steps")
    p.add_argument("--synthetic", help="synthetic pairs of the training pool (textdiff synthesize --masks <data>/train-groundtruth)")
    p.add_argument("--synthetic-ratio", type=int, default=4, help="synthetic copies used per real image")
    p.add_argument("--skip-timing", action="store_true", help="skip timing the feature cache, latency and memory")


def _speed_commands(command) -> None:
    """Where the time goes, and Dice against the minutes it takes."""
    model = parent(model_options)
    p = command("profile", cmd_profile, "where the seconds of head training and of pretraining go on this machine: "
                "a table per phase (feature extraction, cache reads, fusion, head, loss, validation, ...); the head trains as "
                "train.* says (--set train.steps=20 for a shorter run)", [model])
    p.add_argument("--data", required=True, help="studies folder with labeled images")
    p.add_argument("--labels", type=int, default=5, help="labeled images the head trains on (a seeded draw)")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="pretraining epochs of a fresh backbone (0: skip)")
    p.add_argument("--pretrain-batch-size", type=int, default=8)
    p.add_argument("--out", help="JSON file for both tables")

    p = command("time-to-model", cmd_time_to_model, "test Dice against the minutes of training, on this machine: "
                "TextDiff's head (and pretraining + head) and a MONAI UNet from scratch at a few budgets each",
                [model])
    p.add_argument("--data", required=True, help="folder with train/ (the labeled pool) and test/")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", type=int, default=5, help="labeled images per run (a seeded draw, as in benchmark)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--head-steps", nargs="+", type=int, default=[25, 50, 100, 200])
    p.add_argument("--unet-steps", nargs="+", type=int, default=[100, 200, 400, 800])
    p.add_argument("--pretrained", nargs="*", metavar="MINUTES=FOLDER",
                   help="backbones pretrained for that many minutes on this machine (`textdiff pretrain --minutes`)")
    p.add_argument("--unet-feature-scales", type=int, default=0,
                   help="also a UNet (with flips) reading the image and this many of the backbone's finest feature "
                        "scales as input channels (0: not run)")
    methods = ["head", "continued", "pretrained", "unet", "unet-flips", "unet-features"]  # time_to_model.METHODS
    p.add_argument("--methods", nargs="+", choices=methods, default=methods,
                   help="which methods to run (unet-features needs --unet-feature-scales)")

    p = command("infer-speed", cmd_infer_speed, "seconds per image and per volume of a trained model's inference, "
                "and its Dice, in float32 and the fast reading, at each window overlap given")
    p.add_argument("--model", required=True, help="a TextDiff checkpoint")
    p.add_argument("--data", nargs="*", default=[], help="studies folders with labeled 2D images")
    p.add_argument("--volume", help="a NIfTI volume, resampled to --volume-shape and segmented whole")
    p.add_argument("--volume-shape", nargs=3, type=int, default=[256, 256, 100])
    p.add_argument("--overlaps", nargs="+", type=float, default=[0.25], help="window overlaps to read at")
    p.add_argument("--side-by-side", nargs="+", type=int, default=[2],
                   help="images (windows, a volume's slices) read at a time on the CPU, each in a thread")
    p.add_argument("--out", help="JSON file for the table")

    p = command("backbone-speed", cmd_backbone_speed, "parameters, feature channels and seconds of diffusion features "
                "per 256² image for each backbone (a folder, a file, or random:default / random:guided-imagenet-256)")
    p.add_argument("--backbone", nargs="+", required=True)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per backbone (the fastest is kept)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (float16 there)")
    p.add_argument("--out", help="JSON file for the table")


def _supervision_commands(command) -> None:
    """Fewer masks: CDM's masks from image-level labels, and which image to label next."""
    model = parent(model_options)
    p = command("cdm-benchmark", cmd_cdm_benchmark, "CDM vs Grad-CAM vs reconstruction masks, and CDM pseudo-labels",
                [model])
    p.add_argument("--data", default="sample-data")
    p.add_argument("--cdm", required=True, help="folder written by cdm-train")
    p.add_argument("--out", default="benchmark-results")
    p.add_argument("--real-masks", type=int, default=5)
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2],
                   help="TextDiff runs with and without pseudo-labels per seed; none: score the masks only")
    p.add_argument("--steps", type=int, default=400, help="TextDiff optimizer steps per run")
    p.add_argument("--classifier-epochs", type=int, default=30)
    p.add_argument("--choose-readout", action="store_true", help="choose the CDM's noise level, threshold and largest "
                   "component on the training images (their masks) before scoring the test images")

    p = command("al-benchmark", cmd_al_benchmark, "simulate active learning: test Dice per labeling round per strategy",
                [model])
    p.add_argument("--data", default="sample-data")
    p.add_argument("--out", default="benchmark-results")
    p.add_argument("--start", type=int, default=5, help="labeled images before the first round")
    p.add_argument("--step", type=int, default=5, help="images labeled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="optimizer steps per training, in passes over the training windows each "
                   "ended by validation (default: the app's step budget, train.steps)")
    p.add_argument("--strategies", nargs="+", default=["random", "uncertainty", "diverse"])
    p.add_argument("--continued", action="store_true", help="each round's training starts from the last round's "
                   "head, as the app's retrains do (continue_from_current); default: a new head every round")
    p.add_argument("--gate", action="store_true", help="a round's model replaces the last one only where the app's "
                   "publish gate would publish it (its Dice on the run's held-out images, or on a new label left out "
                   "of one more run, not lower); the next round continues from the model kept")
    p.add_argument("--left-out-runs", type=int, default=1, help="with --gate: new labels left out of one more run "
                   "each when a round holds nothing out (the app's left_out_runs)")


def _analysis_commands(command) -> None:
    p = command("benchmark-compare", cmd_benchmark_compare,
                "two methods of benchmark runs, paired by labels and seed, overall and per group of test images")
    p.add_argument("--a", nargs="+", required=True, help="benchmark output folders of the first method")
    p.add_argument("--b", nargs="+", required=True, help="benchmark output folders of the second method")
    p.add_argument("--method-a", help="method to take from the --a folders (needed when they hold several)")
    p.add_argument("--method-b", help="method to take from the --b folders (needed when they hold several)")
    p.add_argument("--data", default="sample-data", help="the benchmark's data: its test reports give the groups")
    p.add_argument("--out", default="benchmark-comparison")

    p = command("benchmark-summary", cmd_benchmark_summary,
                "one table, plot and results.json from several benchmark runs (e.g. one process per method or seed)")
    p.add_argument("results", nargs="+", help="benchmark output folders")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="test Dice vs labels", help="title of the plot")
    p.add_argument("--reference", nargs="*", metavar="NAME=DICE",
                   help="published results drawn as dashed lines, e.g. 'LViT-T, all labels=0.8036'")

    p = command("al-summary", cmd_al_summary, "one table and plot from several al-benchmark runs (e.g. one per seed)")
    p.add_argument("results", nargs="+", help="al-benchmark output folders")
    p.add_argument("--out", required=True)


def build_parser():
    return command_line("textdiff-bench", __doc__, (_benchmark_commands, _speed_commands, _supervision_commands,
                                                          _analysis_commands))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
