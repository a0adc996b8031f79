"""CDM weak supervision: class-conditional UNet, its training on image-level labels, and masks from its denoising."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
from textdiff.weak.cdm import CDM, conditional_unet, image_level_label, labeled_images, load_cdm, train_cdm
from textdiff.weak.cdm_masks import cdm_segment, condition_maps, reconstruction_maps, threshold_map, trajectories
from textdiff.config import CDMConfig
from textdiff.data.studies import Case, DataError, read_studies
from textdiff.training.pretrain import PretrainSettings


@pytest.fixture(scope="module")
def tiny_cdm(h) -> CDM:
    """A tiny CDM whose two class embeddings differ (random, as after training)."""
    unet, scheduler = conditional_unet(2, h.tiny_backbone())
    torch.manual_seed(0)
    torch.nn.init.normal_(unet.class_embedding.weight)
    return CDM(unet, scheduler, CDMConfig(noise_level=100, ddim_steps=4))


def _images(h, count=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, h.size, h.size, generator=generator) * 2 - 1


def test_image_level_labels_come_from_the_label_column_or_the_report(tmp_path):
    cfg = CDMConfig()
    image = tmp_path / "a.png"
    assert image_level_label(Case("a", image, report="anything", image_label="infection"), cfg) == "infection"
    assert image_level_label(Case("a", image, report="No pulmonary infection."), cfg) == "normal"
    assert image_level_label(Case("a", image, report="normal chest radiograph"), cfg) == "normal"
    assert image_level_label(Case("a", image, report="Unilateral pulmonary infection, one infected area."), cfg) == "infection"
    assert image_level_label(Case("a", image), cfg) is None
    several = CDMConfig(classes=("normal", "infection", "nodule"))
    assert image_level_label(Case("a", image, report="A finding."), several) is None  # which abnormal class? unknown


def test_config_rejects_settings_that_cannot_work():
    with pytest.raises(ValueError, match="healthy_class"):
        CDMConfig(classes=("infection", "nodule"))
    with pytest.raises(ValueError, match="tau"):
        CDMConfig(tau=1.5)
    with pytest.raises(ValueError, match="multiple of"):
        CDMConfig(noise_level=400, ddim_steps=7)


def test_a_backbone_becomes_a_conditional_unet_that_starts_as_that_denoiser(h, tmp_path):
    cfg = h.tiny_backbone()
    base = build_unet(cfg)
    folder = save_diffusion(base, build_scheduler(cfg), tmp_path / "backbone")
    unet, _ = conditional_unet(2, cfg, init=str(folder))
    assert unet.config.num_class_embeds == 2
    assert torch.count_nonzero(unet.class_embedding.weight) == 0
    x, t = _images(h), torch.tensor([10, 500])
    with torch.no_grad():
        expected = base(x, t).sample
        for label in (0, 1):
            assert torch.allclose(unet(x, t, class_labels=torch.tensor([label, label])).sample, expected, atol=1e-5)


def test_class_weights_give_the_mixed_embedding(tiny_cdm):
    table = tiny_cdm.unet.class_embedding
    assert torch.equal(table(torch.tensor([1])), table(torch.tensor([[0.0, 1.0]])))
    mixed = table(torch.tensor([[0.05, 0.95]]))
    assert torch.allclose(mixed, 0.95 * table.weight[1] + 0.05 * table.weight[0])


def test_the_two_trajectories_share_their_start_and_differ_only_by_the_condition(tiny_cdm, h):
    images = _images(h)
    a, b = tiny_cdm.class_weights("infection").expand(2, -1), tiny_cdm.class_weights("normal").expand(2, -1)
    together = trajectories(tiny_cdm, images, [a, b])
    alone = [trajectories(tiny_cdm, images, [c])[0] for c in (a, b)]
    assert len(together[0]) == tiny_cdm.cfg.ddim_steps
    for joint, single in zip(together, alone):  # batching the two does not change either
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(joint, single))
    same = trajectories(tiny_cdm, images, [a, a.clone()])
    assert all(torch.equal(x, y) for x, y in zip(*same))  # same condition, same start: identical paths
    assert not torch.allclose(together[0][-1], together[1][-1])  # the condition alone moves them apart


def test_the_map_is_deterministic_normalised_and_zero_when_the_condition_does_not_move(tiny_cdm, h):
    images = _images(h)
    maps = condition_maps(tiny_cdm, images, "infection")
    assert maps.shape == (2, h.size, h.size)
    assert maps.min() == 0 and torch.allclose(maps.amax((1, 2)), torch.ones(2))
    assert torch.equal(maps, condition_maps(tiny_cdm, images, "infection"))
    still = CDM(tiny_cdm.unet, tiny_cdm.scheduler, dataclasses.replace(tiny_cdm.cfg, tau=1.0))
    assert torch.count_nonzero(condition_maps(still, images, "infection", normalise=False)) == 0
    assert torch.count_nonzero(condition_maps(still, images, "infection")) == 0
    assert threshold_map(condition_maps(still, images, "infection")[0], still.cfg).sum() == 0
    # identical class embeddings: the trajectories coincide whatever tau is
    same = CDM(conditional_unet(2, h.tiny_backbone())[0], tiny_cdm.scheduler, tiny_cdm.cfg)
    assert torch.count_nonzero(condition_maps(same, images, "infection", normalise=False)) == 0


def test_reconstruction_map_shape_and_range(tiny_cdm, h):
    maps = reconstruction_maps(tiny_cdm, _images(h))
    assert maps.shape == (2, h.size, h.size) and maps.min() == 0 and maps.max() == 1


def test_thresholds_otsu_fixed_and_largest_component():
    soft = torch.zeros(20, 20)
    soft[2:6, 2:6], soft[10:18, 10:18] = 0.9, 1.0
    otsu = threshold_map(soft, CDMConfig())
    assert otsu.shape == (1, 20, 20) and otsu.dtype == torch.uint8 and otsu.sum() == 16 + 64
    assert threshold_map(soft, CDMConfig(threshold=0.95)).sum() == 64
    assert threshold_map(soft, CDMConfig(largest_component=True)).sum() == 64
    assert threshold_map(torch.full((5, 5), 0.3), CDMConfig()).sum() == 0


def test_segment_keeps_the_image_shape_and_skips_healthy_images(tiny_cdm, h):
    image = torch.rand(1, 50, 40) * 1000
    mask, soft = cdm_segment(tiny_cdm, image, "infection")
    assert mask.shape == soft.shape == (1, 50, 40) and mask.dtype == torch.uint8
    assert 0 < mask.sum() < mask.numel() and soft.min() >= 0 and soft.max() <= 1
    volume = torch.rand(1, 50, 40, 3)
    assert cdm_segment(tiny_cdm, volume, None)[0].shape == (1, 50, 40, 3)  # unknown label: the only abnormal class
    mask, soft = cdm_segment(tiny_cdm, image, "normal")
    assert mask.sum() == 0 and soft.sum() == 0
    with pytest.raises(DataError, match="not a CDM class"):
        cdm_segment(tiny_cdm, image, "fracture")


def test_train_cdm_on_image_labels_and_load_it_back(sample_dir, h, tmp_path):
    cases = read_studies(sample_dir / "train")
    out = tmp_path / "cdm"
    history = train_cdm(cases, out, CDMConfig(noise_level=100, ddim_steps=5), PretrainSettings(epochs=2, batch_size=4),
                        arch=h.tiny_backbone(), progress=False)
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((out / "cdm.json").read_text())["noise_level"] == 100
    cdm = load_cdm(out, tau=0.9)
    assert cdm.cfg.tau == 0.9 and cdm.cfg.noise_level == 100 and cdm.image_size == h.size
    assert torch.count_nonzero(cdm.unet.class_embedding.weight) > 0  # the classes were learned from
    images, labels = labeled_images(cases, cdm.cfg, h.size, 1)
    assert images.shape == (len(cases), 1, h.size, h.size) and set(labels.tolist()) == {0, 1}


def test_a_cdm_run_shows_its_maps_at_each_save_and_continues_where_it_stopped(sample_dir, h, tmp_path, caplog):
    cases = read_studies(sample_dir / "train")
    out, maps, cfg = tmp_path / "cdm", tmp_path / "maps", CDMConfig(noise_level=100, ddim_steps=5)
    settings = PretrainSettings(epochs=2, batch_size=4, save_every=1)
    with caplog.at_level("INFO", logger="textdiff.weak.cdm_progress"):
        train_cdm(cases, out, cfg, settings, arch=h.tiny_backbone(), progress=False, maps_folder=maps)
    assert sorted(p.name for p in maps.iterdir()) == ["epoch-0001.png", "epoch-0002.png"]
    assert "epoch 2: CDM masks of" in caplog.text and "Dice" in caplog.text  # training images with a drawn mask
    before = {name: value.clone() for name, value in load_cdm(out).unet.state_dict().items()}
    history = train_cdm(cases, out, cfg, dataclasses.replace(settings, epochs=1), init=str(out), progress=False,
                        maps_folder=maps)
    assert [row["epoch"] for row in history] == [1, 2, 3] and (maps / "epoch-0003.png").is_file()
    after = load_cdm(out).unet.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it trained on from there


def test_train_cdm_needs_healthy_and_abnormal_images(sample_dir, h, tmp_path):
    infected = [c for c in read_studies(sample_dir / "train") if c.image_label == "infection"]
    with pytest.raises(DataError, match="healthy class 'normal'"):
        train_cdm(infected, tmp_path / "cdm", CDMConfig(), PretrainSettings(epochs=1), arch=h.tiny_backbone())
    odd = [dataclasses.replace(infected[0], image_label="fracture")] + infected[1:]
    with pytest.raises(DataError, match="fracture"):
        train_cdm(odd, tmp_path / "cdm", CDMConfig(), PretrainSettings(epochs=1), arch=h.tiny_backbone())
    with pytest.raises(FileNotFoundError, match="not a CDM"):
        load_cdm(tmp_path)


def test_gradcam_maps_have_the_image_size_and_unit_range(h):
    from textdiff_bench.gradcam import ClassifierSettings, cam_maps, train_classifier

    images, labels = _images(h, 4), torch.tensor([0, 1, 0, 1])
    net = train_classifier(images, labels, 2, ClassifierSettings(epochs=1, batch_size=2), progress=False)
    maps = cam_maps(net, images, 1)
    assert maps.shape == (4, h.size, h.size) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert np.isfinite(maps.numpy()).all()


def test_a_corrected_proposal_loses_false_regions_gains_missed_ones_and_keeps_outlines():
    from textdiff_bench.cdm_benchmark import corrected_proposal

    truth, proposal = torch.zeros(1, 12, 12, dtype=torch.long), torch.zeros(1, 12, 12, dtype=torch.long)
    truth[0, 1:4, 1:4] = 1  # found, with another outline
    truth[0, 8:11, 8:11] = 1  # missed
    proposal[0, 2:6, 2:6] = 1
    proposal[0, 8:10, 1:3] = 1  # nothing there
    expected = torch.zeros_like(truth)
    expected[0, 2:6, 2:6] = 1
    expected[0, 8:11, 8:11] = 1
    assert torch.equal(corrected_proposal(proposal, truth), expected)


def test_pseudo_labels_join_training_only_and_never_replace_a_real_mask(sample_dir, h, monkeypatch, tmp_path):
    import textdiff.training.runs as train_module

    seen = {}

    def spy(model, train_items, val_items, cfg, **kwargs):
        seen["train"], seen["val"] = [i["id"] for i in train_items], [i["id"] for i in val_items]
        return train_module.TrainResult([], 0.0, 0)

    monkeypatch.setattr(train_module, "train_head", spy)
    cases = read_studies(sample_dir / "train")
    real = [c for c in cases if c.label is not None]
    truth = sample_dir / "train-groundtruth"
    pseudo = [dataclasses.replace(c, label=truth / f"{c.id}.png") for c in cases]  # one per image, real ones too
    train = dataclasses.replace(h.tiny_config().train, val_fraction=0.25, min_val_images=1)  # one of four held out
    cfg = dataclasses.replace(h.tiny_config(), train=train)
    train_module.train_on_cases(real, cfg, tmp_path / "m.pt", pseudo_cases=pseudo, progress=False)
    unlabeled = sorted(c.id for c in cases if c.label is None)
    assert len(seen["val"]) == 1 and seen["val"][0] in {c.id for c in real}
    assert sorted(seen["train"]) == sorted({c.id for c in real} - set(seen["val"]) | set(unlabeled))
    train_module.train_on_cases([], cfg, tmp_path / "m.pt", pseudo_cases=pseudo[:2], progress=False)  # cold start
    assert sorted(seen["train"]) == sorted(c.id for c in pseudo[:2]) and seen["val"] == []


def test_cdm_benchmark_reports_every_method_and_the_pseudo_label_difference(sample_dir, h, tmp_path, capsys):
    from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
    from textdiff_bench.cdm_benchmark import CDMBenchmarkSettings, run_cdm_benchmark
    from textdiff_bench.gradcam import ClassifierSettings

    cfg = h.tiny_config()
    backbone = save_diffusion(build_unet(cfg.backbone), build_scheduler(cfg.backbone), tmp_path / "backbone")
    cdm = tmp_path / "cdm"
    train_cdm(read_studies(sample_dir / "train"), cdm, CDMConfig(noise_level=100, ddim_steps=5),
              PretrainSettings(epochs=1, batch_size=4), init=str(backbone), progress=False)
    settings = CDMBenchmarkSettings(real_masks=2, seeds=(0,), steps=2, classifier=ClassifierSettings(epochs=1),
                                    choose_readout=True)
    result = run_cdm_benchmark(sample_dir, str(cdm), str(backbone), tmp_path / "out", settings, cfg)
    readout = result["readout_selection"]  # chosen on the training images, then used for the test images
    assert {row["noise_level"] for row in readout["rows"]} == {100, 200, 500}  # 400 / 5 steps: uneven, left out
    assert max(row["dice"] for row in readout["rows"]) == next(
        row["dice"] for row in readout["rows"] if all(row[k] == v for k, v in readout["chosen"].items()))
    assert result["cdm_config"]["noise_level"] == readout["chosen"]["noise_level"]
    assert set(result["maps"]["methods"]) == {"cdm", "gradcam", "reconstruction"}
    for row in result["maps"]["methods"].values():
        assert 0 <= row["dice"] <= 1 and row["seconds_per_image"] > 0 and len(row["images"]) == 3
    pseudo = result["pseudo_labels"]
    assert [r["training_images"] for r in pseudo["rows"]][:2] == [2, 6]  # 2 real, then + 4 pseudo-labeled
    plain, extended, gated, cold = pseudo["rows"]  # the gate keeps the run with the higher validation Dice
    assert gated["kept"] == (extended if extended["val_dice"] > plain["val_dice"] else plain)["variant"]
    assert gated["dice"] == (extended if extended["val_dice"] > plain["val_dice"] else plain)["dice"]
    assert pseudo["difference"] == pytest.approx(pseudo["summary"]["real + CDM pseudo-labels"]["mean"]
                                                 - pseudo["summary"]["real only"]["mean"])
    assert json.loads((tmp_path / "out" / "cdm_results.json").read_text())["maps"]["test_images"] == 3
    assert (tmp_path / "out" / "cdm_map_examples.png").is_file() and (tmp_path / "out" / "cdm_dice.png").is_file()
    assert cold["variant"] == "corrected CDM proposals" and 0 <= cold["changed_pixels"] <= 1
    printed = capsys.readouterr().out
    assert "| CDM (condition derivative) |" in printed and "| gate kept |" in printed
    masks_only = run_cdm_benchmark(sample_dir, str(cdm), str(backbone), tmp_path / "masks",
                                   dataclasses.replace(settings, seeds=(), choose_readout=False), cfg)
    assert masks_only["pseudo_labels"] is None and set(masks_only["maps"]["methods"]) == set(result["maps"]["methods"])
    assert "gate" not in capsys.readouterr().out.split("Masks from image-level labels")[-1]


def test_smoothing_spreads_a_peak_before_the_threshold(tiny_cdm, h):
    from textdiff.weak.cdm_masks import smoothed

    raw = torch.zeros(2, 16, 16)
    raw[0, 8, 8], raw[1, 3, 3] = 5.0, 1.0
    sharp, blurred = smoothed(raw, 0), smoothed(raw, 2)
    assert torch.equal(sharp, raw / raw.flatten(1).max(1).values[:, None, None])  # only normalised
    assert blurred.shape == raw.shape and float(blurred.amax()) == 1.0 and float(blurred.amin()) == 0.0
    assert int((blurred[0] > 0.5).sum()) > int((sharp[0] > 0.5).sum()) == 1  # the peak became a region
    assert blurred[1].argmax() == 3 * 16 + 3  # each map on its own
    cfg = dataclasses.replace(tiny_cdm.cfg, smooth=2.0)
    images = _images(h)
    blurred_maps = condition_maps(CDM(tiny_cdm.unet, tiny_cdm.scheduler, cfg), images, "infection")
    torch.testing.assert_close(blurred_maps, smoothed(condition_maps(tiny_cdm, images, "infection", normalise=False), 2))
    with pytest.raises(ValueError, match="cdm.smooth"):
        CDMConfig(smooth=-1)


def test_clipping_keeps_a_few_extreme_pixels_from_flattening_the_map():
    from textdiff.weak.cdm_masks import smoothed

    raw = torch.zeros(1, 20, 20)
    raw[0, 5:10, 5:10] = 1.0  # the region
    raw[0, 0, 0] = 100.0  # one extreme border pixel
    assert float(smoothed(raw, 0)[0, 5:10, 5:10].max()) == pytest.approx(0.01)  # squashed by the extreme pixel
    clipped = smoothed(raw, 0, clip=1.0)
    assert float(clipped[0, 5:10, 5:10].min()) == 1.0 and float(clipped[0, 15, 15]) == 0.0
