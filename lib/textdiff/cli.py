"""The `textdiff` command line: pretrain, train, predict, evaluate, import-lvit, export-dicom, make-sample-data,
benchmark, al-benchmark, the CDM's cdm-train, cdm-predict and cdm-benchmark, and EMIT-Diff's synth-train and synthesize."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from textdiff.config import TextDiffConfig, with_overrides
from textdiff.errors import DataError


def _parse_set(values: list[str]) -> dict:
    """`--set train.epochs=10 backbone.timesteps=[50,150] head.label_names=[background,nucleus]`: values are JSON
    when they parse, lists of words in brackets, else strings."""
    overrides = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes section.name=value, got '{item}'")
        overrides[key] = _value(raw)
    return overrides


def _value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if raw.startswith("[") and raw.endswith("]"):  # [background,nucleus]: a shell ate the quotes
            return [_value(part.strip()) for part in raw[1:-1].split(",") if part.strip()]
        return raw


def _config(args) -> TextDiffConfig:
    overrides = {k: v for k, v in _parse_set(args.set).items() if not k.startswith("cdm.")}
    if getattr(args, "backbone", None):
        overrides["backbone.pretrained"] = args.backbone
    if getattr(args, "text_encoder", None):
        overrides["text.encoder"] = args.text_encoder
    if getattr(args, "epochs", None) is not None:
        overrides["train.epochs"] = args.epochs
    if getattr(args, "train_steps", None) is not None:
        overrides["train.steps"] = args.train_steps
    if getattr(args, "healthy_label", None) is not None:
        overrides.setdefault("train.healthy_label", args.healthy_label or None)
    return with_overrides(TextDiffConfig(), overrides)


def _pairs(items: list[str] | None, usage: str, last: bool = False) -> list[tuple[str, str]]:
    """`A=B` options as (A, B), split at the first "=" (at the last with `last`: names that hold one)."""
    pairs = []
    for item in items or []:
        key, sep, value = item.rpartition("=") if last else item.partition("=")
        if not sep:
            raise ValueError(f"{usage.split()[0]} takes {usage.split()[1]}, got '{item}'")
        pairs.append((key, value))
    return pairs


def cmd_make_sample_data(args) -> None:
    from textdiff.data.sample_data import make_sample_data

    density = {"opacity": tuple(args.opacity)} if args.opacity else {}
    summary = make_sample_data(args.out, n_train=args.train, n_test=args.test, n_labeled=args.labeled, seed=args.seed,
                               **density)
    print(json.dumps(summary, indent=1))


def cmd_export_dicom(args) -> None:
    from textdiff.data.dicom import export_studies, exported_files, stow

    cfg = _config(args)
    studies = export_studies(args.data, args.out, list(cfg.head.label_names), args.volume_modality,
                             args.pixel_spacing)
    masks = sum(s.seg_file is not None for s in studies)
    print(f"{len(studies)} studies ({masks} with a DICOM SEG mask) written to {args.out}")
    if args.stow:
        count = stow(exported_files(studies), args.stow)
        print(f"{count} instances stored in {args.stow} (STOW-RS)")


def cmd_import_lvit(args) -> None:
    from textdiff.data.lvit import import_lvit

    count = import_lvit(args.images, args.masks, args.text, args.out, allow_missing_reports=args.allow_missing_reports)
    print(f"imported {count} images into {args.out}")


def cmd_pretrain(args) -> None:
    from textdiff.training.pretrain import STOP_REASONS, PretrainSettings, pretrain

    cfg = _config(args)
    history = []
    if args.init and (Path(args.init) / "history.json").exists():
        history = json.loads((Path(args.init) / "history.json").read_text())
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                history=history, save_half=args.half, max_minutes=args.minutes, patience=args.patience)
    result = pretrain(args.data, args.out, cfg.backbone, settings, init=args.init)
    print(f"backbone written to {args.out} (last loss {result[-1]['loss']:.4f} after {len(result)} epochs; "
          f"{STOP_REASONS[result[-1]['stopped']]})")


def _section_overrides(args, section: str, only: bool = True) -> dict:
    """`--set cdm.tau=0.9 synth.guidance_scale=5`: the named section's settings, by name (other sections are an
    error when `only`)."""
    overrides = _parse_set(args.set)
    wrong = [key for key in overrides if not key.startswith(f"{section}.")]
    if wrong and only:
        raise ValueError(f"these settings are not {section}.<name>: {wrong}")
    return {key.partition(".")[2]: value for key, value in overrides.items() if key.startswith(f"{section}.")}


def cmd_cdm_train(args) -> None:
    from textdiff.weak.cdm import train_cdm
    from textdiff.config import CDMConfig
    from textdiff.data.studies import read_studies
    from textdiff.training.pretrain import PretrainSettings

    cfg = CDMConfig.from_dict(_section_overrides(args, "cdm"))
    cases = [case for folder in args.data for case in read_studies(folder)]
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                class_embedding_lr=args.embedding_lr)
    maps = args.maps if args.maps is not None else f"{Path(args.out)}-maps"
    history = train_cdm(cases, args.out, cfg, settings, init=args.init, maps_folder=maps or None)
    print(f"CDM written to {args.out} (last loss {history[-1]['loss']:.4f} after {len(history)} epochs)"
          + (f"; maps of training images at each save in {maps}" if maps else ""))


def cmd_cdm_predict(args) -> None:
    import numpy
    from tqdm.auto import tqdm

    from textdiff.weak.cdm import image_level_label, load_cdm
    from textdiff.weak.cdm_masks import cdm_segment
    from textdiff.data.studies import read_image
    from textdiff.training.predict import heatmap_png, mask_extension, overlay_png, save_mask

    cdm = load_cdm(args.model, args.device, **_section_overrides(args, "cdm"))
    out = Path(args.out)
    (out / "soft").mkdir(parents=True, exist_ok=True)
    for case in tqdm(_cases_for(args.images), desc="cdm-predict"):
        image = read_image(case.image, "image")
        mask, soft = cdm_segment(cdm, image, args.image_label or image_level_label(case, cdm.cfg))
        print(save_mask(mask, case.image, out / f"{case.id}{mask_extension(case.image)}"))
        soft_ext = ".nii.gz" if case.image.name.lower().endswith((".nii", ".nii.gz")) else ".nrrd"
        save_mask(soft, case.image, out / "soft" / f"{case.id}{soft_ext}", dtype=numpy.float32)
        if soft.dim() == 3:  # 2D: pictures to check at a glance
            overlay_png(image, mask, out / "soft" / f"{case.id}_overlay.png")
            heatmap_png(image, soft, out / "soft" / f"{case.id}_heatmap.png")


def cmd_train(args) -> None:
    import dataclasses

    from textdiff.data.studies import find_by_id, read_studies
    from textdiff.plots import plot_training
    from textdiff.training.train import healthy_cases, train_on_cases

    cfg = _config(args)  # bad settings fail before any data is read
    studies = read_studies(args.data)
    cases = [c for c in studies if c.label is not None][: args.limit or None]
    pseudo = []
    if args.pseudo_labels:
        if not Path(args.pseudo_labels).is_dir():
            raise DataError(f"pseudo-label folder '{args.pseudo_labels}' does not exist")
        pseudo = [dataclasses.replace(c, label=find_by_id(Path(args.pseudo_labels), c.id)) for c in studies if c.label is None]
    if not cases and not any(c.label for c in pseudo):
        raise DataError(f"no image in '{args.data}' has a mask under labels/final: nothing to train on")
    synthetic = None
    if args.synthetic:
        from textdiff.synthesis.synthetic import read_synthetic

        synthetic = read_synthetic(args.synthetic)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, synthetic_ratio=args.synthetic_ratio))
    _, result = train_on_cases(cases, cfg, args.out, args.device, pseudo_cases=pseudo,
                               healthy=healthy_cases(studies, cfg.train.healthy_label), synthetic=synthetic,
                               unlabeled=[c for c in studies if c.label is None], compare_without=args.compare_without)
    plot = plot_training(result.history, Path(args.out).with_suffix(".png"))
    if result.gate:
        print(f"kept the run {result.gate['kept']} (validation Dice {result.gate['dice_with']:.4f} with them, "
              f"{result.gate['dice_without']:.4f} without)")
    best = result.history[result.best_epoch - 1]
    print(f"best validation Dice {result.best_dice:.4f} after {best['step']} steps (round {result.best_epoch}); "
          f"model {args.out}; curves {plot}")


def cmd_synth_train(args) -> None:
    from textdiff.config import SynthConfig, TextConfig
    from textdiff.data.studies import read_studies
    from textdiff.synthesis.emit import train_synth
    from textdiff.training.pretrain import PretrainSettings

    cfg = SynthConfig.from_dict(_section_overrides(args, "synth"))
    cases = [case for folder in args.data for case in read_studies(folder)]
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    history = train_synth(cases, args.out, cfg, TextConfig(encoder=args.text_encoder), settings, init=args.init)
    print(f"EMIT-Diff model written to {args.out} (last loss {history[-1]['loss']:.4f} after {len(history)} epochs)")


def cmd_synthesize(args) -> None:
    import dataclasses

    from textdiff.data.studies import find_by_id, read_studies
    from textdiff.synthesis.emit import load_synth
    from textdiff.synthesis.synthetic import CONTACT_SHEET, synthesize

    model = load_synth(args.model, args.device)
    cases = read_studies(args.data)
    if args.masks:
        if not Path(args.masks).is_dir():
            raise DataError(f"mask folder '{args.masks}' does not exist")
        cases = [dataclasses.replace(c, label=find_by_id(Path(args.masks), c.id)) for c in cases]
    manifest = synthesize(model, cases, args.out, args.per_image, args.seed, args.guidance, args.steps)
    sources = len({pair["source"] for pair in manifest["pairs"]})
    print(f"{len(manifest['pairs'])} synthetic pairs of {sources} labeled images in {args.out}; "
          f"contact sheet {Path(args.out) / CONTACT_SHEET}")


def _cases_for(paths: list[str]) -> list:
    """Cases from image files and studies folders (with their masks and reports)."""
    from textdiff.data.studies import Case, image_id, read_studies

    cases = []
    for raw in paths:
        path = Path(raw)
        cases += read_studies(path) if path.is_dir() else [Case(image_id(path), path)]
    return cases


def cmd_predict(args) -> None:
    from tqdm.auto import tqdm

    from textdiff.data.studies import read_image
    from textdiff.training.inference import segment_image
    from textdiff.model.segmenter import load_checkpoint
    from textdiff.training.predict import mask_extension, overlay_png, save_mask

    model = load_checkpoint(args.model, args.device)
    cases = _cases_for(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc="segment", unit="img"):
        image = read_image(case.image, "image")
        mask = segment_image(model, image, case.report if args.text is None else args.text, progress=True,
                             fast=not args.float32)
        print(save_mask(mask, case.image, out / f"{case.id}{mask_extension(case.image)}"))
        if mask[0].dim() == 2:  # a 2D image: a picture to check at a glance
            overlay_png(image, mask, out / f"{case.id}_overlay.png")


def cmd_evaluate(args) -> None:
    from textdiff.training.inference import score_cases
    from textdiff.model.segmenter import load_checkpoint

    model = load_checkpoint(args.model, args.device)
    cases = [c for c in _cases_for([args.data]) if c.label is not None]
    if not cases:
        raise DataError(f"no labeled images in {args.data}")
    scores = score_cases(model, cases, progress=True)
    text = json.dumps(scores, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(scores["mean"]))


def cmd_benchmark(args) -> None:
    from textdiff.research.benchmark import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(label_counts=tuple(args.labels), seeds=tuple(args.seeds), steps=args.steps,
                                 methods=tuple(args.methods), synthetic=args.synthetic,
                                 synthetic_ratio=args.synthetic_ratio, timing=not args.skip_timing)
    run_benchmark(Path(args.data), args.backbone, Path(args.out), settings, _config(args))


def cmd_profile(args) -> None:
    from textdiff.research.profile import run_profile

    run_profile(Path(args.data), _config(args), args.labels, args.pretrain_epochs, args.pretrain_batch_size,
                Path(args.out) if args.out else None)


def cmd_time_to_model(args) -> None:
    from textdiff.research.time_to_model import TimeToModelSettings, run_time_to_model

    pretrained = {float(minutes): folder for minutes, folder in _pairs(args.pretrained, "--pretrained MINUTES=FOLDER")}
    settings = TimeToModelSettings(labels=args.labels, seeds=tuple(args.seeds), head_steps=tuple(args.head_steps),
                                   unet_steps=tuple(args.unet_steps), pretrained=pretrained)
    run_time_to_model(Path(args.data), args.backbone, Path(args.out), settings, _config(args))


def cmd_infer_speed(args) -> None:
    from textdiff.research.infer_speed import Reading, run_infer_speed

    readings = [Reading(fast, overlap) for overlap in args.overlaps for fast in (False, True)]
    run_infer_speed(Path(args.model), [Path(d) for d in args.data], readings, Path(args.volume) if args.volume else None,
                    tuple(args.volume_shape), Path(args.out) if args.out else None)


def cmd_benchmark_compare(args) -> None:
    from textdiff.research.compare import run_comparison

    run_comparison(args.a, args.b, Path(args.data), Path(args.out), args.method_a, args.method_b)


def cmd_benchmark_summary(args) -> None:
    from textdiff.research.benchmark import merge_runs

    references = {name: float(value) for name, value in _pairs(args.reference, "--reference NAME=VALUE", last=True)}
    merge_runs(args.results, Path(args.out), args.title, references)


def cmd_cdm_benchmark(args) -> None:
    from textdiff.research.cdm_benchmark import CDMBenchmarkSettings, run_cdm_benchmark
    from textdiff.research.gradcam import ClassifierSettings

    settings = CDMBenchmarkSettings(real_masks=args.real_masks, seeds=tuple(args.seeds), steps=args.steps,
                                    choose_readout=args.choose_readout,
                                    classifier=ClassifierSettings(epochs=args.classifier_epochs))
    run_cdm_benchmark(Path(args.data), args.cdm, args.backbone, Path(args.out), settings, _config(args),
                      _section_overrides(args, "cdm", only=False))


def cmd_al_benchmark(args) -> None:
    from textdiff.research.al_benchmark import LabelingSettings, run_labeling_benchmark

    settings = LabelingSettings(start=args.start, step=args.step, rounds=args.rounds, seeds=tuple(args.seeds),
                                steps=args.steps, strategies=tuple(args.strategies))
    run_labeling_benchmark(Path(args.data), args.backbone, Path(args.out), settings, _config(args))


def cmd_al_summary(args) -> None:
    from textdiff.research.al_benchmark import summarise_labeling

    rows = [row for folder in args.results for row in json.loads((Path(folder) / "al_results.json").read_text())["rows"]]
    summarise_labeling(rows, Path(args.out))


def cmd_backbone_speed(args) -> None:
    from textdiff.research.backbone_speed import run_backbone_speed

    run_backbone_speed(args.backbone, Path(args.out) if args.out else None, args.repeats, args.device)


def build_parser() -> argparse.ArgumentParser:
    """The `textdiff` command: each group of commands registers its own; shared options come from parent parsers."""
    parser = argparse.ArgumentParser(prog="textdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text, parents=()):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=list(parents))
        p.set_defaults(func=func)
        return p

    for register in (_data_commands, _training_commands, _generative_commands, _inference_commands,
                     _benchmark_commands, _analysis_commands):
        register(command)
    return parser


def _set_option(p, section: str, example: str) -> None:
    """--set, repeatable: `--set a=1 --set b=2` keeps both."""
    p.add_argument("--set", nargs="*", action="extend", metavar=f"{section}.NAME=VALUE", help=f"e.g. {example}")


def _parent(*adders) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _device(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], or auto: cuda when present")


def _text_encoder(p) -> None:
    p.add_argument("--text-encoder", help="transformers folder or hf:<hub id> (default: packaged all-MiniLM-L6-v2)")


def _model(p) -> None:
    """What every command that builds a TextDiff model takes."""
    p.add_argument("--backbone", help="the pretrained UNet: a diffusers folder, a guided-diffusion .pt file, or hf:<hub id> "
                   "(docs/backbones.md; default: random init)")
    _text_encoder(p)
    _set_option(p, "SECTION", "train.epochs=20")
    _device(p)


def _denoiser_training(p) -> None:
    """What every command that trains a diffusion model takes (pretrain, cdm-train, synth-train)."""
    p.add_argument("--data", nargs="+", required=True, help="studies folder(s)")
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)


def _data_commands(command) -> None:
    p = command("make-sample-data", cmd_make_sample_data, "write the synthetic chest X-ray sample data")
    p.add_argument("--out", default="sample-data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=70, help="training images (e.g. 200 more unlabeled ones for pretraining)")
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--labeled", type=int, default=20, help="training images that get a final label")
    p.add_argument("--opacity", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="range of an infected area's peak density (default 0.5 0.9; lower: fainter opacities, harder)")

    p = command("export-dicom", cmd_export_dicom, "write a studies folder as DICOM (reports in ImageComments, "
                "final masks as DICOM SEG) and optionally upload it to a PACS over STOW-RS")
    p.add_argument("--data", required=True, help="studies folder")
    p.add_argument("--out", required=True, help="folder for the DICOM files, one subfolder per image")
    p.add_argument("--stow", metavar="URL", help="DICOMweb root to upload to, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--volume-modality", default="CT", choices=["CT", "MR", "OT"], help="modality of 3D volumes "
                   "(2D images are DX)")
    p.add_argument("--pixel-spacing", type=float, help="mm per pixel when the files carry none (PNG/JPG: 1 mm)")
    _set_option(p, "SECTION", "head.label_names=[background,lesion]")

    p = command("import-lvit", cmd_import_lvit, "import an LViT-format dataset into a studies folder")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True, help="mask folder (LViT's labelcol); the text file's Image column names "
                   "these files")
    p.add_argument("--text", required=True, help="Excel or CSV with columns Image and Description")
    p.add_argument("--out", required=True)
    p.add_argument("--allow-missing-reports", action="store_true")


def _training_commands(command) -> None:
    p = command("pretrain", cmd_pretrain, "pretrain the diffusion backbone on unlabeled images",
                [_parent(_denoiser_training)])
    p.add_argument("--init", help="continue from this diffusers folder")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size; loaded as float32)")
    p.add_argument("--minutes", type=float, help="stop after this much wall-clock time (the model is saved then)")
    p.add_argument("--patience", type=int, help="stop once the denoising loss has not improved by 1%% in this many "
                   "epochs")
    _set_option(p, "SECTION", "backbone.image_size=64")

    p = command("train", cmd_train, "train the cross-attention and head on the labeled images of a studies folder",
                [_parent(_model)])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="checkpoint file (.pt)")
    p.add_argument("--steps", dest="train_steps", type=int, help="optimizer steps (default: train.steps, 100)")
    p.add_argument("--epochs", type=int, help="passes over every training window instead of --steps")
    p.add_argument("--limit", type=int, help="use only the first N labeled images")
    p.add_argument("--healthy-label", default="normal", help="images with this image-level label (reports.csv) and no "
                   "mask also train, with an empty mask, as the app does by default (\"\": off)")
    p.add_argument("--pseudo-labels", help="folder of masks (e.g. from cdm-predict) for images with no final mask; "
                   "they join training only, never validation")
    p.add_argument("--synthetic", help="folder of synthetic pairs (textdiff synthesize) mixed into training (EMIT-Diff)")
    p.add_argument("--synthetic-ratio", type=int, default=4, help="synthetic copies used per real image")
    p.add_argument("--compare-without", action="store_true", help="with --pseudo-labels or --synthetic, also train "
                   "without them on the same split and keep the run with the higher validation Dice")


def _generative_commands(command) -> None:
    p = command("cdm-train", cmd_cdm_train, "train the class-conditional diffusion model on image-level labels",
                [_parent(_denoiser_training)])
    p.set_defaults(batch_size=8)
    p.add_argument("--init", help="start from this diffusers folder (the pretrained backbone), or continue the CDM "
                   "in this folder (its epochs count on)")
    p.add_argument("--maps", help="folder for the maps of a few training images at each save (default: <out>-maps; "
                   "\"\": none)")
    p.add_argument("--embedding-lr", type=float, default=3e-3,
                   help="learning rate of the class embedding, which starts at zero on a pretrained backbone")
    _set_option(p, "cdm", "cdm.tau=0.9 cdm.classes=[normal,infection]")

    p = command("synth-train", cmd_synth_train, "train the EMIT-Diff model (edge map + text conditioned diffusion)",
                [_parent(_denoiser_training, _text_encoder)])
    p.add_argument("--init", help="start from this pretrained backbone (its layout, weights and scheduler), as "
                   "EMIT-Diff starts from a pretrained diffusion model: far fewer steps than from scratch")
    _set_option(p, "synth", "synth.image_size=64")

    p = command("synthesize", cmd_synthesize, "synthetic image-mask pairs of the labeled images, plus a contact sheet",
                [_parent(_device)])
    p.add_argument("--model", required=True, help="folder written by synth-train")
    p.add_argument("--data", required=True, help="studies folder whose labeled images are copied")
    p.add_argument("--masks", help="take masks from this folder instead of labels/final (e.g. train-groundtruth)")
    p.add_argument("--out", required=True, help="a new folder: synthetic pairs never go into a studies folder")
    p.add_argument("--per-image", type=int, default=4, help="synthetic copies per labeled image")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 9)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's, 20)")
    p.add_argument("--seed", type=int, default=0)


def _inference_commands(command) -> None:
    p = command("cdm-predict", cmd_cdm_predict, "masks and soft maps from the CDM (no pixel label needed)",
                [_parent(_device)])
    p.add_argument("--model", required=True, help="folder written by cdm-train")
    p.add_argument("--images", nargs="+", required=True, help="image files or studies folders")
    p.add_argument("--out", required=True, help="masks here, soft maps and PNG previews in <out>/soft/")
    p.add_argument("--image-label", help="class of every image (default: its label or report; healthy -> empty mask)")
    _set_option(p, "cdm", "cdm.tau=0.9 cdm.threshold=0.5")

    p = command("predict", cmd_predict, "segment images: mask files with the image geometry plus PNG overlays",
                [_parent(_device)])
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files or studies folders")
    p.add_argument("--out", required=True)
    p.add_argument("--text", help="report to use for every image (default: the studies folder's reports.csv)")
    p.add_argument("--float32", action="store_true", help="read as `textdiff evaluate` does: float32, and a volume's "
                   "slices in the model's overlapping windows (default, the fast reading: bfloat16 where the CPU computes "
                   "it natively, a volume's slices in windows side by side; about 3x faster for a volume)")

    p = command("evaluate", cmd_evaluate, "Dice and IoU per image and mean against labels/final, as JSON",
                [_parent(_device)])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", help="JSON file")


def _benchmark_commands(command) -> None:
    model = _parent(_model)
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
                   help="backbones pretrained for that many minutes on this machine (textdiff pretrain --minutes)")

    p = command("infer-speed", cmd_infer_speed, "seconds per image and per volume of a trained model's inference, "
                "and its Dice, in float32 and the fast reading, at each window overlap given")
    p.add_argument("--model", required=True, help="a TextDiff checkpoint")
    p.add_argument("--data", nargs="*", default=[], help="studies folders with labeled 2D images")
    p.add_argument("--volume", help="a NIfTI volume, resampled to --volume-shape and segmented whole")
    p.add_argument("--volume-shape", nargs=3, type=int, default=[256, 256, 100])
    p.add_argument("--overlaps", nargs="+", type=float, default=[0.25], help="window overlaps to read at")
    p.add_argument("--out", help="JSON file for the table")

    p = command("backbone-speed", cmd_backbone_speed, "parameters, feature channels and seconds of diffusion features "
                "per 256² image for each backbone (a folder, a file, or random:default / random:guided-imagenet-256)")
    p.add_argument("--backbone", nargs="+", required=True)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per backbone (the fastest is kept)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (float16 there)")
    p.add_argument("--out", help="JSON file for the table")

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


def _resolve_device(args) -> None:
    """`--device auto` (the default) becomes cuda when torch sees a GPU: torch loads only for commands that run."""
    if getattr(args, "device", None) == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _resolve_device(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # GPU decoder absence is normal
    try:
        args.func(args)
    except (DataError, FileNotFoundError, ValueError, TypeError) as err:
        print(f"textdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
