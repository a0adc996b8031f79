"""The `textdiff` command line: pretrain, train, predict, evaluate, import-lvit, export-dicom, make-sample-data, the
CDM's cdm-train and cdm-predict, and EMIT-Diff's synth-train and synthesize (benchmarks: `textdiff-bench`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from textdiff.config import TextDiffConfig, with_overrides
from textdiff.errors import DataError


def parse_set(values: list[str]) -> dict:
    """`--set train.epochs=10 backbone.timesteps=[50,150] head.label_names=[background,nucleus]`: values are JSON
    when they parse, lists of words in brackets, else strings."""
    overrides = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise DataError(f"--set takes section.name=value, got '{item}'")
        overrides[key] = _value(raw)
    return overrides


def _value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if raw.startswith("[") and raw.endswith("]"):  # [background,nucleus]: a shell ate the quotes
            return [_value(part.strip()) for part in raw[1:-1].split(",") if part.strip()]
        return raw


def config_from_args(args) -> TextDiffConfig:
    overrides = {k: v for k, v in parse_set(args.set).items() if not k.startswith("cdm.")}
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


def pairs(items: list[str] | None, usage: str, last: bool = False) -> list[tuple[str, str]]:
    """`A=B` options as (A, B), split at the first "=" (at the last with `last`: names that hold one)."""
    pairs = []
    for item in items or []:
        key, sep, value = item.rpartition("=") if last else item.partition("=")
        if not sep:
            raise DataError(f"{usage.split()[0]} takes {usage.split()[1]}, got '{item}'")
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

    cfg = config_from_args(args)
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

    cfg = config_from_args(args)
    history = []
    if args.init and (Path(args.init) / "history.json").exists():
        history = json.loads((Path(args.init) / "history.json").read_text())
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                history=history, save_half=args.half, max_minutes=args.minutes, patience=args.patience,
                                bfloat16=args.bfloat16)
    result = pretrain(args.data, args.out, cfg.backbone, settings, init=args.init)
    print(f"backbone written to {args.out} (last loss {result[-1]['loss']:.4f} after {len(result)} epochs; "
          f"{STOP_REASONS[result[-1]['stopped']]})")


def section_overrides(args, section: str, only: bool = True) -> dict:
    """`--set cdm.tau=0.9 synth.guidance_scale=5`: the named section's settings, by name (other sections are an
    error when `only`)."""
    overrides = parse_set(args.set)
    wrong = [key for key in overrides if not key.startswith(f"{section}.")]
    if wrong and only:
        raise DataError(f"these settings are not {section}.<name>: {wrong}")
    return {key.partition(".")[2]: value for key, value in overrides.items() if key.startswith(f"{section}.")}


def cmd_cdm_train(args) -> None:
    from textdiff.weak.cdm import train_cdm
    from textdiff.config import CDMConfig
    from textdiff.data.studies import read_studies
    from textdiff.training.pretrain import PretrainSettings

    cfg = CDMConfig.from_dict(section_overrides(args, "cdm"))
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
    from textdiff.writers import heatmap_png, mask_extension, overlay_png, save_mask

    cdm = load_cdm(args.model, args.device, **section_overrides(args, "cdm"))
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
    from textdiff.training.options.extra_labels import healthy_cases
    from textdiff.training.runs import train_on_cases
    from textdiff.training.train import longer_run_hint

    cfg = config_from_args(args)  # bad settings fail before any data is read
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
    _, result = train_on_cases(cases, cfg, args.out, args.device, cache_folder=args.feature_cache, pseudo_cases=pseudo,
                               healthy=healthy_cases(studies, cfg.train.healthy_label), synthetic=synthetic,
                               unlabeled=[c for c in studies if c.label is None], compare_without=args.compare_without)
    plot = plot_training(result.history, Path(args.out).with_suffix(".png"))
    if result.gate:
        print(f"kept the run {result.gate['kept']} (validation Dice {result.gate['dice_with']:.4f} with them, "
              f"{result.gate['dice_without']:.4f} without)")
    kept = result.history[result.best_epoch - 1]
    print(f"kept {result.kept}: Dice {result.best_dice:.4f} after {kept['step']} steps; model {args.out}; "
          f"curves {plot}")
    if result.short_on_labels:
        print(longer_run_hint(result, cfg.train.batch_size))


def cmd_synth_train(args) -> None:
    from textdiff.config import SynthConfig, TextConfig
    from textdiff.data.studies import read_studies
    from textdiff.synthesis.emit import train_synth
    from textdiff.training.pretrain import PretrainSettings

    cfg = SynthConfig.from_dict(section_overrides(args, "synth"))
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
    from textdiff.inference import segment_image
    from textdiff.model.segmenter import load_checkpoint
    from textdiff.writers import mask_extension, overlay_png, save_mask

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
    from textdiff.evaluation import score_cases
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


def command_line(prog: str, description: str, registers) -> argparse.ArgumentParser:
    """A command with subcommands: each group of commands registers its own; shared options come from parent parsers
    (`parent`, `model_options`). The benchmarks' `textdiff-bench` is built the same way."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text, parents=()):
        p = sub.add_parser(name, help=help_text, description=help_text, parents=list(parents))
        p.set_defaults(func=func)
        return p

    for register in registers:
        register(command)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return command_line("textdiff", __doc__, (_data_commands, _training_commands, _generative_commands,
                                              _inference_commands))


def _set_option(p, section: str, example: str) -> None:
    """--set, repeatable: `--set a=1 --set b=2` keeps both."""
    p.add_argument("--set", nargs="*", action="extend", metavar=f"{section}.NAME=VALUE", help=f"e.g. {example}")


def parent(*adders) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _device(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda[:N], or auto: cuda when present")


def _text_encoder(p) -> None:
    p.add_argument("--text-encoder", help="transformers folder or hf:<hub id> (default: packaged all-MiniLM-L6-v2)")


def model_options(p) -> None:
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
                [parent(_denoiser_training)])
    p.add_argument("--init", help="continue from this diffusers folder")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (half the size; loaded as float32)")
    p.add_argument("--minutes", type=float, help="stop after this much wall-clock time (the model is saved then)")
    p.add_argument("--patience", type=int, help="stop once the denoising loss has not improved by 1%% in this many "
                   "epochs")
    p.add_argument("--bfloat16", action="store_true", help="compute in bfloat16 on a CPU that does so natively "
                   "(AVX512-BF16, AMX): an epoch in about 4/5 of the time")
    _set_option(p, "SECTION", "backbone.image_size=64")

    p = command("train", cmd_train, "train the cross-attention and head on the labeled images of a studies folder",
                [parent(model_options)])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="checkpoint file (.pt)")
    p.add_argument("--steps", dest="train_steps", type=int, help="optimizer steps (default: train.steps, 150)")
    p.add_argument("--epochs", type=int, help="passes over every training window instead of --steps")
    p.add_argument("--limit", type=int, help="use only the first N labeled images")
    p.add_argument("--feature-cache", help="folder that keeps the diffusion features of every window a run reads, by "
                   "image name and backbone, as the app does: a later run on the same images and backbone (a longer "
                   "run, other head settings) skips those backbone passes, half of a run on many labels "
                   "(docs/results/speed.md); about 3 MB a 128² window; use a new folder if images change under the "
                   "same names")
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
                [parent(_denoiser_training)])
    p.set_defaults(batch_size=8)
    p.add_argument("--init", help="start from this diffusers folder (the pretrained backbone), or continue the CDM "
                   "in this folder (its epochs count on)")
    p.add_argument("--maps", help="folder for the maps of a few training images at each save (default: <out>-maps; "
                   "\"\": none)")
    p.add_argument("--embedding-lr", type=float, default=3e-3,
                   help="learning rate of the class embedding, which starts at zero on a pretrained backbone")
    _set_option(p, "cdm", "cdm.tau=0.9 cdm.classes=[normal,infection]")

    p = command("synth-train", cmd_synth_train, "train the EMIT-Diff model (edge map + text conditioned diffusion)",
                [parent(_denoiser_training, _text_encoder)])
    p.add_argument("--init", help="start from this pretrained backbone (its layout, weights and scheduler), as "
                   "EMIT-Diff starts from a pretrained diffusion model: far fewer steps than from scratch")
    _set_option(p, "synth", "synth.image_size=64")

    p = command("synthesize", cmd_synthesize, "synthetic image-mask pairs of the labeled images, plus a contact sheet",
                [parent(_device)])
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
                [parent(_device)])
    p.add_argument("--model", required=True, help="folder written by cdm-train")
    p.add_argument("--images", nargs="+", required=True, help="image files or studies folders")
    p.add_argument("--out", required=True, help="masks here, soft maps and PNG previews in <out>/soft/")
    p.add_argument("--image-label", help="class of every image (default: its label or report; healthy -> empty mask)")
    _set_option(p, "cdm", "cdm.tau=0.9 cdm.threshold=0.5")

    p = command("predict", cmd_predict, "segment images: mask files with the image geometry plus PNG overlays",
                [parent(_device)])
    p.add_argument("--model", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files or studies folders")
    p.add_argument("--out", required=True)
    p.add_argument("--text", help="report to use for every image (default: the studies folder's reports.csv)")
    p.add_argument("--float32", action="store_true", help="read as `textdiff evaluate` does: float32, and a volume's "
                   "slices in the model's overlapping windows (default, the fast reading: bfloat16 where the CPU computes "
                   "it natively, a volume's slices in windows side by side; about 3x faster for a volume)")

    p = command("evaluate", cmd_evaluate, "Dice and IoU per image and mean against labels/final, as JSON",
                [parent(_device)])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", help="JSON file")


def _resolve_device(args) -> None:
    """`--device auto` (the default) becomes cuda when torch sees a GPU: torch loads only for commands that run."""
    if getattr(args, "device", None) == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run one subcommand: the user's bad data or settings (DataError, a missing file) in one line and exit
    status 2; a bug keeps its traceback."""
    args = parser.parse_args(argv)
    _resolve_device(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # GPU decoder absence is normal
    try:
        args.func(args)
    except (DataError, FileNotFoundError) as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
