"""EMIT-Diff synthetic augmentation: condition maps, guidance, the merging mask, synthetic pairs on disk, training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from textdiff.config import BackboneConfig, SynthConfig, TextConfig, TrainConfig
from textdiff.data.studies import SYNTHETIC_MARKER, DataError, load_case, read_studies
from textdiff.synthesis.emit import (
    condition_map, guided_noise, load_synth, merge_predictions, merging_mask, train_synth,
)
from textdiff.training.pretrain import PretrainSettings
from textdiff.synthesis.synthetic import CONTACT_SHEET, read_synthetic, synthesize

TINY_SIZE = 32  # the tiny models' image size, as in conftest
TINY_SYNTH = SynthConfig(image_size=TINY_SIZE, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, ddim_steps=3)


@pytest.fixture(scope="module")
def synth_model(sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "model"
    history = train_synth(read_studies(sample_dir / "train"), out, TINY_SYNTH, TextConfig(max_tokens=16),
                          PretrainSettings(epochs=2, batch_size=4, save_every=1), progress=False)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    return load_synth(out)


@pytest.fixture(scope="module")
def pairs(synth_model, sample_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "synthetic"
    manifest = synthesize(synth_model, read_studies(sample_dir / "train"), out, per_image=2, seed=1, progress=False)
    return out, manifest


def test_condition_map_has_image_edges_and_mask_outline():
    image = -torch.ones(1, 32, 32)
    image[:, 8:24, 8:24] = 1  # a bright square: edges on its border
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, 2:6, 26:30] = 1  # a lesion elsewhere, invisible in the image
    edges_only = condition_map(image, None, sigma=1.0)
    both = condition_map(image, mask, sigma=1.0)
    assert edges_only.shape == (1, 32, 32) and set(edges_only.unique().tolist()) <= {0.0, 1.0}
    assert edges_only[0, 8:24, 8:24].sum() > 0 and edges_only[0, 14:18, 14:18].sum() == 0  # border, not inside
    assert edges_only[0, 0:8, 24:32].sum() == 0 and both[0, 2:6, 26:30].sum() > 0  # the mask outline is added


def test_guidance_scale_one_is_the_conditional_prediction(synth_model):
    denoiser = synth_model.denoiser
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, TINY_SIZE, TINY_SIZE, generator=gen)
    condition = (torch.rand(2, 1, TINY_SIZE, TINY_SIZE, generator=gen) > 0.8).float()
    tokens, mask = synth_model.encode(["Left lung.", "Right lung."])
    step = torch.tensor([500])
    with torch.no_grad():
        conditional = denoiser(x, step.expand(2), condition, tokens, mask)
        unconditional = denoiser(x, step.expand(2), condition, *denoiser.unconditional(2))
        assert torch.allclose(guided_noise(denoiser, x, step, condition, tokens, mask, 1.0), conditional, atol=1e-5)
        assert torch.allclose(guided_noise(denoiser, x, step, condition, tokens, mask, 0.0), unconditional, atol=1e-5)
        nine = guided_noise(denoiser, x, step, condition, tokens, mask, 9.0)
    assert torch.allclose(nine, unconditional + 9 * (conditional - unconditional), atol=1e-4)


def test_training_drops_prompts_for_guidance(synth_model):
    denoiser = synth_model.denoiser
    x, condition = torch.randn(64, 1, TINY_SIZE, TINY_SIZE), torch.zeros(64, 1, TINY_SIZE, TINY_SIZE)
    tokens, mask = synth_model.encode(["Left lung."] * 64)
    step = torch.full((64,), 300)
    with torch.no_grad():
        conditional = denoiser(x, step, condition, tokens, mask)
        unconditional = denoiser(x, step, condition, *denoiser.unconditional(64))
        denoiser.train()
        denoiser.text_dropout = 0.5
        mixed = denoiser(x, step, condition, tokens, mask)
        denoiser.eval()
        denoiser.text_dropout = TINY_SYNTH.text_dropout
    as_unconditional = torch.isclose(mixed, unconditional, atol=1e-5).flatten(1).all(1)
    as_conditional = torch.isclose(mixed, conditional, atol=1e-5).flatten(1).all(1)
    assert torch.all(as_unconditional ^ as_conditional)  # each sample is one or the other
    assert 15 < as_unconditional.sum() < 49  # about half, as asked


def test_merging_mask_takes_real_patches_at_rate_alpha():
    gen = torch.Generator().manual_seed(0)
    mask = merging_mask(400, 64, alpha=0.6, patch=16, generator=gen)
    assert mask.shape == (400, 1, 64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert abs(mask.mean().item() - 0.6) < 0.02
    patches = mask.unfold(2, 16, 16).unfold(3, 16, 16)  # every patch is all real or all synthetic
    assert torch.equal(patches.amax((-1, -2)), patches.amin((-1, -2)))
    assert merging_mask(2, 40, 0.5, 16, gen).shape == (2, 1, 40, 40)  # sizes that patches do not divide


def test_merge_predictions_picks_real_or_synthetic_per_pixel():
    gen = torch.Generator().manual_seed(1)
    real, synthetic = torch.zeros(3, 2, 32, 32), torch.ones(3, 2, 32, 32)
    merged = merge_predictions(real, synthetic, 0.6, 8, gen)
    assert set(merged.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(merge_predictions(real, synthetic, 1.0, 8, gen), real)
    assert torch.equal(merge_predictions(real, synthetic, 0.0, 8, gen), synthetic)


def test_synthetic_pairs_keep_the_source_mask_and_report(pairs, sample_dir):
    out, manifest = pairs
    sources = {c.id: c for c in read_studies(sample_dir / "train") if c.label is not None}
    assert manifest["synthetic"] and len(manifest["pairs"]) == 2 * len(sources)
    copies = read_synthetic(out)
    assert set(copies) == set(sources)
    for source, group in copies.items():
        real = load_case(sources[source], TINY_SIZE, 1, 2)["label"]  # the source mask at the model's size
        assert real.any() or "No " in sources[source].report
        images = []
        for case in group:
            assert case.report == sources[source].report
            assert torch.equal(load_case(case, TINY_SIZE, 1, 2)["label"], real)
            images.append(np.array(Image.open(case.image)))
            assert images[-1].shape == (TINY_SIZE, TINY_SIZE) and images[-1].dtype == np.uint8
        assert not np.array_equal(images[0], images[1])  # two different draws
    assert (out / CONTACT_SHEET).stat().st_size > 1000


def test_synthesize_is_reproducible_by_seed(synth_model, sample_dir, pairs, tmp_path):
    again = synthesize(synth_model, read_studies(sample_dir / "train"), tmp_path / "again", per_image=2, seed=1,
                       progress=False)
    first = pairs[0] / pairs[1]["pairs"][0]["image"]
    assert np.array_equal(np.array(Image.open(first)), np.array(Image.open(tmp_path / "again" / again["pairs"][0]["image"])))


def test_synthetic_pairs_are_never_read_as_real_studies(pairs, sample_dir, synth_model, tmp_path):
    out, _ = pairs
    for folder in (out, out / "images"):
        with pytest.raises(DataError, match="synthetic image-mask pairs"):
            read_studies(folder)
    with pytest.raises(DataError, match="studies folder"):  # never written into a studies folder
        synthesize(synth_model, read_studies(sample_dir / "train"), sample_dir / "train", 1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a synthetic-pairs folder"):
        synthesize(synth_model, read_studies(sample_dir / "train"), tmp_path / "other", 1, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="SYNTHETIC.json"):
        read_synthetic(sample_dir / "train")
    assert json.loads((out / SYNTHETIC_MARKER).read_text())["synthetic"] is True


def test_synthetic_copies_join_training_only(pairs, sample_dir, tmp_path, h):
    from textdiff.training.runs import train_on_cases

    cases = read_studies(sample_dir / "train")
    cfg = h.tiny_config()
    train = dataclasses.replace(cfg.train, epochs=3, synthetic_ratio=2, val_fraction=0.25, min_val_images=1)
    cfg = dataclasses.replace(cfg, train=train)
    model, result = train_on_cases(cases, cfg, tmp_path / "syn.pt", synthetic=read_synthetic(pairs[0]), progress=False)
    assert len(result.history) == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    _, gated = train_on_cases(cases, cfg, tmp_path / "gated.pt", synthetic=read_synthetic(pairs[0]), progress=False,
                              compare_without=True)
    assert gated.gate["extras"] == "synthetic copies"
    assert gated.gate["kept"] in ("with synthetic copies", "without synthetic copies")
    assert gated.best_dice == pytest.approx(max(gated.gate["dice_with"], gated.gate["dice_without"]), abs=1e-4)
    assert sorted(p.name for p in tmp_path.glob("gated*")) == ["gated.pt"]
    with pytest.raises(DataError, match="synthetic pairs"):
        train_on_cases(cases, cfg, tmp_path / "none.pt", synthetic=None, progress=False)


def test_train_head_with_synthetic_copies_differs_from_without(make_model, labeled_items):
    from textdiff.training.train import train_head

    train = labeled_items[:3]
    copies = {it["id"]: [{**it, "id": it["id"] + "_syn", "image": -it["image"]}] for it in train}
    results = []
    for ratio in (0, 1):
        model = make_model(seed=0)
        cfg = dataclasses.replace(model.cfg.train, epochs=2, synthetic_ratio=ratio)
        results.append(train_head(model, train, [], cfg, progress=False, synthetic=copies).history)
    assert results[0][0]["loss"] != results[1][0]["loss"]  # the synthetic copies were seen


def test_train_config_refuses_bad_synthetic_settings():
    for bad in ({"synthetic_ratio": -1}, {"merge_alpha": 1.5}, {"merge_patch": 0}):
        with pytest.raises(ValueError, match="synthetic_ratio"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="one entry per"):
        SynthConfig(block_out_channels=(8, 16, 32))


def test_benchmark_compares_with_and_without_synthetic_pairs(pairs, sample_dir, h, tmp_path, capsys):
    from textdiff_bench.benchmark import METHODS, BenchmarkSettings, run_benchmark

    with pytest.raises(ValueError, match="need --synthetic"):
        BenchmarkSettings(methods=("unet_synthetic",))
    with pytest.raises(ValueError, match="unknown benchmark method"):
        BenchmarkSettings(methods=("textdiff", "magic"))
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, merge_patch=8))
    settings = BenchmarkSettings(label_counts=(3,), seeds=(0,), steps=2, methods=tuple(METHODS), synthetic=str(pairs[0]),
                                 synthetic_ratio=2)
    result = run_benchmark(sample_dir, None, tmp_path / "bench", settings, cfg)
    assert {row["method"] for row in result["rows"]} == set(METHODS) | {"textdiff_synthetic_gated"}
    assert all(0 <= row["dice"] <= 1 for row in result["rows"])
    rows = {row["method"]: row for row in result["rows"]}  # the gate keeps the run with the higher validation Dice
    kept = "textdiff_synthetic" if rows["textdiff_synthetic"]["val_dice"] > rows["textdiff"]["val_dice"] else "textdiff"
    assert rows["textdiff_synthetic_gated"]["kept"] == kept
    assert rows["textdiff_synthetic_gated"]["dice"] == rows[kept]["dice"]
    assert "TextDiff + synthetic (EMIT-Diff)" in capsys.readouterr().out
    assert (tmp_path / "bench" / "dice_vs_labels.png").is_file()


def test_a_generator_started_from_a_backbone_denoises_as_the_backbone_until_trained(sample_dir, tmp_path):
    from diffusers import UNet2DModel

    from textdiff.model.backbone import build_scheduler, save_diffusion
    from textdiff.synthesis.emit import synth_unet_from_backbone

    torch.manual_seed(0)
    backbone = UNet2DModel(sample_size=TINY_SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=8, add_attention=False)
    for p in backbone.parameters():  # diffusers zero-initialises some layers; make every weight count
        p.data.normal_(0, 0.2)
    save_diffusion(backbone, build_scheduler(BackboneConfig()), tmp_path / "bb")
    generator, scheduler, cfg = synth_unet_from_backbone(str(tmp_path / "bb"), SynthConfig(), text_dim=384)
    assert cfg.block_out_channels == (8, 16) and cfg.image_size == TINY_SIZE and generator.config.in_channels == 2
    gen = torch.Generator().manual_seed(1)
    x, steps = torch.randn(2, 1, TINY_SIZE, TINY_SIZE, generator=gen), torch.tensor([100, 600])
    edges = (torch.rand(2, 1, TINY_SIZE, TINY_SIZE, generator=gen) > 0.7).float()
    tokens = torch.randn(2, 5, 384, generator=gen)
    with torch.no_grad():
        expected = backbone(x, steps).sample
        given = generator(torch.cat([x, edges], 1), steps, encoder_hidden_states=tokens).sample
    torch.testing.assert_close(given, expected)  # edges and prompt unheard before training; the backbone's denoiser

    history = train_synth(read_studies(sample_dir / "train"), tmp_path / "synth", SynthConfig(), TextConfig(max_tokens=16),
                          PretrainSettings(epochs=1, batch_size=4), progress=False, init=str(tmp_path / "bb"))
    model = load_synth(tmp_path / "synth", ddim_steps=2)
    assert len(history) == 1 and model.cfg.block_out_channels == (8, 16)
    assert json.loads((tmp_path / "synth" / "synth.json").read_text())["init"] == str(tmp_path / "bb")
    sample = model.sample(edges, ["Left lung.", "Right lung."], torch.Generator().manual_seed(0))
    assert sample.shape == (2, 1, TINY_SIZE, TINY_SIZE) and sample.abs().max() <= 1


def test_a_backbone_the_generator_cannot_hold_is_refused(tmp_path):
    from diffusers import UNet2DModel

    from textdiff.model.backbone import build_scheduler, save_diffusion
    from textdiff.synthesis.emit import synth_unet_from_backbone

    class_conditional = UNet2DModel(sample_size=TINY_SIZE, block_out_channels=(8, 16), layers_per_block=1, num_class_embeds=2,
                                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                    norm_num_groups=8)
    save_diffusion(class_conditional, build_scheduler(BackboneConfig()), tmp_path / "cdm")
    with pytest.raises(ValueError, match="does not fit an EMIT-Diff generator.*class_embedding"):
        synth_unet_from_backbone(str(tmp_path / "cdm"), SynthConfig(), text_dim=384)
