"""Training the head: frozen parts stay frozen, the loss goes down, checkpoints rebuild the model."""

import dataclasses

import pytest
import torch

from textdiff.config import TrainConfig
from textdiff.model.features import FeatureCache
from textdiff.model.segmenter import load_checkpoint, predict_logits, save_checkpoint
from textdiff.training.runs import split_train_val
from textdiff.training.train import (CheckpointChoice, dice_per_image, longer_run_hint, selection_items, train_head,
                                     training_rounds, validation_windows)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_leaves_backbone_and_text_encoder_untouched(make_model, labeled_items):
    model = make_model()
    unet_before, text_before = _snapshot(model.extractor.unet), _snapshot(model.text_encoder.model)
    head_before = _snapshot(model.head)
    cfg = dataclasses.replace(model.cfg.train, epochs=2)
    train_head(model, labeled_items[:4], [], cfg, progress=False)
    for key, value in model.extractor.unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    for key, value in model.text_encoder.model.state_dict().items():
        assert torch.equal(value, text_before[key]), key
    assert not any(p.requires_grad for p in model.extractor.unet.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.model.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    changed = [k for k, v in model.head.state_dict().items() if not torch.equal(v, head_before[k])]
    assert any(k.startswith("fusion.") for k in changed)
    assert any(k.startswith("classifier.") for k in changed)
    # trainable parameters are exactly the head's
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.head.parameters()}


def test_model_train_mode_keeps_frozen_parts_in_eval(make_model):
    model = make_model()
    model.train()
    assert model.head.training
    assert not model.extractor.training and not model.extractor.unet.training
    assert not model.text_encoder.training and not model.text_encoder.model.training


def test_training_lowers_the_loss_and_writes_the_best_checkpoint(make_model, labeled_items, tmp_path):
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=6)
    checkpoint = tmp_path / "run" / "model.pt"
    result = train_head(model, labeled_items[:4], labeled_items[4:], cfg, checkpoint=checkpoint, progress=False)
    losses = [row["loss"] for row in result.history]
    assert len(result.history) == 6
    assert [row["epoch"] for row in result.history] == list(range(1, 7))
    assert losses[-1] < losses[0]
    assert all(0.0 <= row["val_dice"] <= 1.0 for row in result.history)
    assert result.best_dice == max(row["val_dice"] for row in result.history)
    assert result.history[result.best_epoch - 1]["val_dice"] == result.best_dice
    assert checkpoint.is_file()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["model.pt"]  # no temp files left
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == result.best_epoch
    assert state["best_val_dice"] == pytest.approx(result.best_dice)

    # the model keeps the best weights, and the checkpoint rebuilds exactly that model
    loaded = load_checkpoint(checkpoint)
    assert loaded.cfg == model.cfg
    model.eval()
    cache = FeatureCache(model.extractor)
    with torch.no_grad():
        original = predict_logits(model, labeled_items[4:], cache)
        rebuilt = predict_logits(loaded, labeled_items[4:], FeatureCache(loaded.extractor))
    torch.testing.assert_close(rebuilt, original, rtol=1e-4, atol=1e-4)
    dice = dice_per_image(original, torch.stack([it["label"] for it in labeled_items[4:]]), 2)
    assert dice.mean().item() == pytest.approx(result.best_dice, abs=1e-6)


@pytest.mark.parametrize("augment", ["rot90_flip", "mirror"])
def test_training_is_reproducible(make_model, labeled_items, augment):
    results = []
    for _ in range(2):
        model = make_model(seed=3)
        cfg = dataclasses.replace(model.cfg.train, epochs=2, text_dropout=0.5, augment=augment)
        results.append(train_head(model, labeled_items[:3], [], cfg, progress=False).history)
    assert [r["loss"] for r in results[0]] == [r["loss"] for r in results[1]]


def test_without_the_cache_each_image_goes_through_the_backbone_once_per_use(make_model, labeled_items, h):
    """What the cache's speed-up is measured against: one backbone pass per training image per epoch, plus one per
    validation image, and nothing more."""
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=2, batch_size=2, cache_features=False)
    calls, handle = h.count_calls(model.extractor.unet)
    try:
        train_head(model, labeled_items[:3], labeled_items[3:4], cfg, progress=False)
    finally:
        handle.remove()
    assert sum(calls) == 2 * (3 + 1) * len(h.timesteps)


def test_training_without_items_raises_clear_error(make_model, labeled_items):
    model = make_model()
    with pytest.raises(ValueError, match="no labeled image to train on"):
        train_head(model, [], [], model.cfg.train, progress=False)
    unlabeled = dict(labeled_items[0], id="nomask", label=None)
    with pytest.raises(ValueError, match="nomask"):
        train_head(model, [labeled_items[1], unlabeled], [], model.cfg.train, progress=False)


def test_checkpoint_stores_backbone_path_relative_to_itself(make_model, tmp_path):
    from textdiff.model.backbone import build_scheduler, save_diffusion

    model = make_model()
    backbone = save_diffusion(model.extractor.unet, build_scheduler(model.cfg.backbone), tmp_path / "project" / "backbone")
    model.cfg = dataclasses.replace(model.cfg, backbone=dataclasses.replace(model.cfg.backbone, pretrained=str(backbone)))
    path = save_checkpoint(model, tmp_path / "project" / "model.pt")
    assert torch.load(path, weights_only=True)["config"]["backbone"]["pretrained"] == "backbone"
    # move the whole project: the checkpoint still finds its backbone
    moved = tmp_path / "moved"
    (tmp_path / "project").rename(moved)
    loaded = load_checkpoint(moved / "model.pt")
    assert loaded.cfg.backbone.pretrained == str(moved / "backbone")
    for key, value in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[key], value)


def test_a_checkpoint_from_before_the_per_scale_entry_loads_as_the_head_it_was(make_model, tmp_path):
    """Heads saved before `head.per_scale_entry` existed upsampled and concatenated their scales: their config has no
    such key, and they must load as that head, with the same weights and logits."""
    from textdiff.model.backbone import build_scheduler, save_diffusion

    model = make_model(per_scale_entry=False).eval()
    backbone = save_diffusion(model.extractor.unet, build_scheduler(model.cfg.backbone), tmp_path / "backbone")
    model.cfg = dataclasses.replace(model.cfg, backbone=dataclasses.replace(model.cfg.backbone, pretrained=str(backbone)))
    path = save_checkpoint(model, tmp_path / "model.pt")
    state = torch.load(path, weights_only=True)
    del state["config"]["head"]["per_scale_entry"]
    torch.save(state, path)
    loaded = load_checkpoint(path)
    assert not loaded.cfg.head.per_scale_entry and make_model().cfg.head.per_scale_entry
    images = torch.rand(2, 1, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(images, ["a", "b"]), model(images, ["a", "b"]), atol=1e-5)


def test_a_model_trained_at_one_noise_step_is_served_at_one(text_encoder, h, tmp_path):
    """`--set backbone.timesteps=[50]` trades a little Dice for a third of the backbone's time
    (docs/results/speed.md): its checkpoint must keep that read-out, or the head would meet three steps' features."""
    from textdiff.model.segmenter import TextDiffModel

    one_step = (h.timesteps[1],)
    cfg = dataclasses.replace(h.tiny_config(), backbone=h.tiny_backbone(timesteps=one_step))
    model = TextDiffModel(cfg, text_encoder=text_encoder).eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "model.pt"))
    assert loaded.cfg.backbone.timesteps == one_step
    images = torch.rand(2, 1, h.size, h.size) * 2 - 1
    calls, handle = h.count_calls(loaded.extractor.unet)
    try:
        with torch.no_grad():
            logits = loaded(images, ["a", "b"])
    finally:
        handle.remove()
    assert calls == [1, 1]  # each image noised once, one UNet pass
    with torch.no_grad():
        assert torch.allclose(logits, model(images, ["a", "b"]), atol=1e-5)


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="textdiff train"):
        load_checkpoint(tmp_path / "absent.pt")


def test_split_train_val_holds_out_a_seeded_fraction_or_nothing_when_too_few():
    items = [{"id": str(i)} for i in range(10)]
    cfg = TrainConfig(val_fraction=0.2, seed=0)
    train, val = split_train_val(items, cfg)
    assert len(val) == 2 and len(train) == 8
    assert {it["id"] for it in train} | {it["id"] for it in val} == {str(i) for i in range(10)}
    assert split_train_val(items, cfg) == (train, val) != split_train_val(items, cfg, seed=1)
    # five labels would hold out one: all five train (one image is a noisy judge and a fifth of the labels)
    few_train, few_val = split_train_val(items[:5], cfg)
    assert few_val == [] and sorted(it["id"] for it in few_train) == ["0", "1", "2", "3", "4"]
    assert len(split_train_val(items[:5], dataclasses.replace(cfg, min_val_images=1))[1]) == 1
    assert split_train_val(items, dataclasses.replace(cfg, val_fraction=0.0))[1] == []


def test_train_config_refuses_an_impossible_split():
    with pytest.raises(ValueError, match="min_val_images"):
        TrainConfig(min_val_images=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_dice_per_image_counts_empty_as_perfect():
    labels = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1
    logits = torch.zeros(2, 2, 4, 4)
    logits[0, 1, :2] = 1.0  # image 0: perfect; image 1: empty predicted empty
    assert dice_per_image(logits, labels, 2).tolist() == [1.0, 1.0]
    logits[1, 1] = 1.0  # image 1: predicts foreground on an empty truth
    assert dice_per_image(logits, labels, 2).tolist() == [1.0, 0.0]


def test_selection_falls_back_to_training_images_when_validation_has_no_foreground():
    infected = {"id": "i", "label": torch.ones(1, 4, 4, dtype=torch.long)}
    normal = {"id": "n", "label": torch.zeros(1, 4, 4, dtype=torch.long)}
    assert selection_items([infected, normal], [normal]) == [infected, normal]
    assert selection_items([normal], [infected, normal]) == [infected, normal]
    assert selection_items([], [infected]) == [infected]


def test_checkpoint_choice_over_a_window_passes_over_a_lone_spike():
    single, windowed = CheckpointChoice(1), CheckpointChoice(3)
    dices = [0.2, 0.9, 0.3, 0.6, 0.7, 0.7]  # window means: 0.2, 0.55, 0.47, 0.6, 0.53, 0.67
    assert [single.is_best(d) for d in dices] == [True, True, False, False, False, False]  # ties: the first stays
    assert [windowed.is_best(d) for d in dices] == [True, True, False, True, False, True]
    with pytest.raises(ValueError, match="selection_window"):
        TrainConfig(selection_window=0)


def test_training_keeps_the_epoch_the_window_chooses(make_model, labeled_items):
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=6, selection_window=3)
    result = train_head(model, labeled_items[:4], labeled_items[4:], cfg, progress=False)
    choice = CheckpointChoice(3)
    chosen = [row["epoch"] for row in result.history if choice.is_best(row["val_dice"])][-1]
    assert result.best_epoch == chosen and result.best_dice == result.history[chosen - 1]["val_dice"]
    model.eval()
    with torch.no_grad():
        logits = predict_logits(model, labeled_items[4:], FeatureCache(model.extractor))
    dice = dice_per_image(logits, torch.stack([it["label"] for it in labeled_items[4:]]), 2)
    assert dice.mean().item() == pytest.approx(result.best_dice, abs=1e-6)  # the model holds that epoch's weights


def test_with_nothing_held_out_the_last_round_is_kept_unless_told_to_choose_on_the_training_images(
        make_model, labeled_items, tmp_path):
    """The training images cannot judge the rounds of a run that learned them: keep the last (the learning rate has
    decayed there) and score only it; `train.checkpoint=best` chooses on them as before."""
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, steps=6, val_every=2, epochs=None)
    result = train_head(model, labeled_items[:4], [], cfg, checkpoint=tmp_path / "last.pt", progress=False)
    assert result.best_epoch == 3 and "the last" in result.kept
    assert [row["val_dice"] is None for row in result.history] == [True, True, False]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
    model.eval()
    with torch.no_grad():
        logits = predict_logits(model, labeled_items[:4], FeatureCache(model.extractor))
    dice = dice_per_image(logits, torch.stack([it["label"] for it in labeled_items[:4]]), 2)
    assert dice.mean().item() == pytest.approx(result.best_dice, abs=1e-6)  # scored on the training images

    chosen = train_head(make_model(), labeled_items[:4], [], dataclasses.replace(cfg, checkpoint="best"),
                        progress=False)
    assert all(row["val_dice"] is not None for row in chosen.history)
    assert chosen.best_dice == max(row["val_dice"] for row in chosen.history)
    assert "the best on the training images" in chosen.kept
    held_out = train_head(make_model(), labeled_items[:4], labeled_items[4:], cfg, progress=False)
    assert "the best on the held-out images" in held_out.kept
    with pytest.raises(ValueError, match="train.checkpoint"):
        TrainConfig(checkpoint="first")


def test_training_on_empty_masks_only_is_refused(make_model, labeled_items):
    empty = [dict(item, label=torch.zeros_like(item["label"])) for item in labeled_items[:3]]
    with pytest.raises(ValueError, match="every mask is empty"):
        train_head(make_model(), empty, [], make_model().cfg.train, progress=False)


def test_pretrained_backbone_decides_the_image_size_and_architecture(tmp_path, h, text_encoder):
    from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
    from textdiff.config import BackboneConfig
    from textdiff.model.segmenter import TextDiffModel

    small = h.tiny_backbone()
    folder = save_diffusion(build_unet(small), build_scheduler(small), tmp_path / "bb32")
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, backbone=BackboneConfig(pretrained=str(folder), feature_layers=small.feature_layers,
                                                           timesteps=small.timesteps))
    model = TextDiffModel(cfg, text_encoder=text_encoder).eval()
    assert model.image_size == h.size
    with torch.no_grad():
        logits = model(torch.zeros(1, 1, model.image_size, model.image_size), [h.normal])
    assert logits.shape == (1, 2, h.size, h.size)
    # the checkpoint records the architecture of the weights, not the config's defaults (channels 16-32-64-128)
    from textdiff.model.segmenter import save_checkpoint

    stored = torch.load(save_checkpoint(model, tmp_path / "head.pt"), weights_only=True)["config"]["backbone"]
    assert tuple(stored["block_out_channels"]) == tuple(small.block_out_channels) != BackboneConfig().block_out_channels
    assert tuple(stored["down_block_types"]) == tuple(small.down_block_types)


def test_healthy_images_without_a_mask_train_with_an_empty_mask(sample_dir, h, monkeypatch, tmp_path):
    """`train.healthy_label`: unlabeled images with that image-level label join the training split, mask empty."""
    import textdiff.training.runs as train_module
    from textdiff.training.options.extra_labels import healthy_cases
    from textdiff.data.studies import read_studies

    seen = {}

    def spy(model, train_items, val_items, cfg, **kwargs):
        seen["train"], seen["val"] = train_items, val_items
        return train_module.TrainResult([], 0.0, 0)

    monkeypatch.setattr(train_module, "train_head", spy)
    # the normal images lose their drawn masks (an empty mask nobody needs to draw)
    cases = [dataclasses.replace(c, label=None) if c.image_label == "normal" else c
             for c in read_studies(sample_dir / "train")]
    real = [c for c in cases if c.label is not None]
    normal = {c.id for c in cases if c.image_label == "normal"}
    assert normal and healthy_cases(cases, None) == []
    healthy = healthy_cases(cases, "normal")
    assert {c.id for c in healthy} == normal
    train_module.train_on_cases(real, h.tiny_config(), tmp_path / "m.pt", healthy=healthy, progress=False)
    added = [it for it in seen["train"] if it["id"] in normal]
    assert len(added) == len(normal) and all(it["label"].shape == (1, h.size, h.size) for it in added)
    assert all(it["label"].sum() == 0 for it in added)
    assert not normal & {it["id"] for it in seen["val"]}  # validation stays on drawn masks


def test_the_same_training_run_gives_the_same_model(sample_dir, h, tmp_path):
    """The head's initial weights come from the run's seed, not from whatever ran before in the process."""
    from textdiff.data.studies import read_studies
    from textdiff.training.runs import train_on_cases

    cases = [c for c in read_studies(sample_dir / "train") if c.label is not None]
    heads = []
    for run in range(2):
        torch.manual_seed(100 + run)  # a different global random state before each run
        model, _ = train_on_cases(cases, h.tiny_config(), tmp_path / f"m{run}.pt", progress=False)
        heads.append(model.head.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def _sparsely_labeled_volume(tmp_path, labeled=(1, 4), depth=6):
    """A NIfTI volume whose structure is in every slice but whose mask is drawn on `labeled` slices only, as a user
    who labels a few slices in a viewer saves it."""
    import nibabel as nib
    import numpy as np
    from textdiff.data.studies import Case

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 50, (32, 32, depth)).astype(np.float32)
    image[8:20, 10:24] += 150
    mask = np.zeros(image.shape, np.uint8)
    for z in labeled:
        mask[8:20, 10:24, z] = 1
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / "scan-mask.nii.gz")
    return Case("scan", tmp_path / "scan.nii.gz", tmp_path / "scan-mask.nii.gz", "Axial MRI.")


EVERY_SLICE = [f"scan#z{z}" for z in range(6)]


@pytest.mark.parametrize("volume_slices, drawn, expected", [
    ("auto", (1, 4), ["scan#z1", "scan#z4"]),
    ("labeled", (1, 4), ["scan#z1", "scan#z4"]),
    ("all", (1, 4), EVERY_SLICE),
    ("auto", (0, 1, 2, 3, 4), EVERY_SLICE),  # five adjacent drawn slices: drawn whole, z5 is background
    ("labeled", (0, 1, 2, 3, 4), EVERY_SLICE[:5]),
])
def test_a_volume_trains_on_its_drawn_slices_unless_drawn_whole(volume_slices, drawn, expected, h, tmp_path,
                                                                 monkeypatch):
    """Slices left empty in a few-slice labeling are not drawn, not background; a volume drawn whole (`auto` sees a
    run of adjacent drawn slices, or `all`) trains every slice, the empty ones as background."""
    import textdiff.training.runs as train_module

    seen = {}

    def spy(model, train_items, val_items, cfg, **kwargs):
        seen["ids"] = sorted(item["id"] for item in train_items + val_items)
        return train_module.TrainResult([], 0.0, 0)

    monkeypatch.setattr(train_module, "train_head", spy)
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, volume_slices=volume_slices))
    train_module.train_on_cases([_sparsely_labeled_volume(tmp_path, drawn)], cfg, tmp_path / "m.pt", progress=False)
    assert seen["ids"] == expected


def test_a_volume_whose_mask_is_empty_everywhere_is_refused(h, tmp_path):
    from textdiff.data.studies import DataError
    from textdiff.training.runs import train_on_cases

    with pytest.raises(DataError, match="every mask is empty"):
        train_on_cases([_sparsely_labeled_volume(tmp_path, labeled=())], h.tiny_config(), tmp_path / "m.pt",
                       progress=False)


def test_a_volume_is_judged_on_its_drawn_slices_when_choosing_a_model_and_whole_when_evaluated(make_model, tmp_path, monkeypatch):
    """A model that finds the structure in every slice is not scored down on the slices nobody drew."""
    import textdiff.evaluation as inference

    model = make_model()
    case = _sparsely_labeled_volume(tmp_path)
    assert len(model.load_planes(case)) == 6 and len(model.load_planes(case, "auto")) == 2

    def structure_everywhere(model, items, **kwargs):
        masks = [torch.zeros(1, *item["original_shape"], dtype=torch.uint8) for item in items]
        for mask in masks:
            mask[:, 8:20, 10:24] = 1
        return masks

    monkeypatch.setattr(inference, "segment_items", structure_everywhere)
    assert inference.dice_on_cases(model, [case], "auto") == pytest.approx(1.0)
    assert inference.dice_on_cases(model, [case]) == pytest.approx(2 / 6)  # four undrawn slices count as misses
    # evaluation judges a volume as a whole (3D Dice), not as the mean over its slices
    scores = inference.score_cases(model, [case])
    assert [row["image"] for row in scores["images"]] == ["scan"]
    assert scores["mean"]["dice"] == pytest.approx(2 * 2 / (6 + 2))


def test_a_step_budget_trains_that_many_steps_in_rounds_each_ended_by_validation(make_model, labeled_items):
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=5, val_every=2, batch_size=2)
    result = train_head(model, labeled_items[:4], labeled_items[4:5], cfg, progress=False)
    assert [row["step"] for row in result.history] == [2, 4, 5]
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.best_dice == max(row["val_dice"] for row in result.history)
    assert result.passes == 5 * 2 / 4 and not result.short_on_labels  # 10 windows drawn of 4


def test_a_run_that_draws_fewer_windows_than_its_labels_hold_says_how_long_a_run_would_read_them(make_model,
                                                                                               labeled_items):
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=2, val_every=2, batch_size=2)
    result = train_head(model, labeled_items[:6], labeled_items[6:7], cfg, progress=False)
    assert result.passes == 2 * 2 / 6 and result.short_on_labels
    hint = longer_run_hint(result, batch_size=2)
    assert "each of the 6 training windows 0.7 times" in hint and "--steps 18" in hint  # 6 passes of 6 windows by 2
    by_epochs = train_head(make_model(), labeled_items[:6], labeled_items[6:7],
                           dataclasses.replace(cfg, epochs=2), progress=False)
    assert by_epochs.passes == 2 and not by_epochs.short_on_labels


def test_training_rounds_are_steps_or_passes_over_the_windows():
    assert training_rounds(45, TrainConfig(steps=100, val_every=20)) == [20] * 5
    assert training_rounds(45, TrainConfig(steps=45, val_every=20)) == [20, 20, 5]
    assert training_rounds(10, TrainConfig(epochs=3, batch_size=4)) == [3, 3, 3]  # ceil(10 / 4) steps a pass
    with pytest.raises(ValueError, match="train.steps"):
        TrainConfig(steps=0)


def test_validation_reads_a_seeded_subset_of_the_held_out_windows_unless_training_by_epochs():
    windows = [{"id": str(i)} for i in range(10)]
    chosen = validation_windows(windows, TrainConfig(val_windows=3))
    assert len(chosen) == 3 and chosen == sorted(chosen, key=lambda w: int(w["id"]))  # in their order
    assert chosen == validation_windows(windows, TrainConfig(val_windows=3))
    assert chosen != validation_windows(windows, TrainConfig(val_windows=3, seed=1))
    assert validation_windows(windows, TrainConfig(val_windows=None)) == windows
    assert validation_windows(windows, TrainConfig(val_windows=3, epochs=2)) == windows


def test_a_short_run_computes_features_only_for_the_windows_it_draws(make_model, labeled_items, h):
    """With a step budget smaller than the data, the backbone reads the drawn windows and the validation ones only."""
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=1, val_every=1, batch_size=2)
    calls, handle = h.count_calls(model.extractor.unet)
    try:
        train_head(model, labeled_items[:6], labeled_items[6:7], cfg, progress=False)
    finally:
        handle.remove()
    assert sum(calls) == (2 + 1) * len(h.timesteps)  # one batch of two windows, one validation image


def test_dice_over_the_batch_does_not_push_a_class_to_zero_in_windows_that_lack_it(make_model, labeled_items):
    """Per window, a small structure absent from a window is pushed to zero there; over the batch it is judged where
    it is, so a prediction right in both windows costs less (train.dice_over_batch)."""
    from textdiff.training.train import segmentation_loss

    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    labels[1, 0, 2:4, 2:4] = 1  # the structure only in the second window
    logits = torch.stack([torch.stack([torch.full((8, 8), 4.0), torch.full((8, 8), -4.0)])] * 2)
    logits[1, :, 2:4, 2:4] = torch.tensor([-4.0, 4.0])[:, None, None]
    assert segmentation_loss(over_batch=True)(logits, labels) < segmentation_loss()(logits, labels) - 0.3
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=2, val_every=2, dice_over_batch=True)
    assert train_head(model, labeled_items[:3], [], cfg, progress=False).history[-1]["step"] == 2


def test_the_training_loop_weighs_the_dice_term_as_train_dice_weight_says(make_model, labeled_items, monkeypatch):
    """Every step's loss is built with the run's `train.dice_weight` and `train.dice_over_batch`."""
    from textdiff.training import train

    built, real = [], train.segmentation_loss
    monkeypatch.setattr(train, "segmentation_loss", lambda *args: built.append(args) or real(*args))
    model = make_model()
    for weight in (0.0, 2.0):
        cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=2, val_every=2, dice_weight=weight)
        train_head(model, labeled_items[:3], [], cfg, progress=False)
    assert built == [(False, 0.0)] * 2 + [(False, 2.0)] * 2


def test_the_pixel_mlp_head_on_cross_entropy_alone_trains_and_loads_back(make_model, labeled_items, tmp_path):
    """The recipe for several small structures (head.classifier "pixel_mlp", train.dice_weight 0) trains, and its
    checkpoint rebuilds the same head."""
    from textdiff.model.backbone import build_scheduler, save_diffusion
    from textdiff.model.fusion import PixelMLPClassifier
    from textdiff.training.train import segmentation_loss

    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    logits = torch.randn(2, 2, 8, 8)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0])
    assert torch.allclose(segmentation_loss(dice_weight=0.0)(logits, labels), ce)
    model = make_model(classifier="pixel_mlp", head_channels=(16, 16))
    backbone = save_diffusion(model.extractor.unet, build_scheduler(model.cfg.backbone), tmp_path / "backbone")
    model.cfg = dataclasses.replace(model.cfg, backbone=dataclasses.replace(model.cfg.backbone, pretrained=str(backbone)),
                                    train=dataclasses.replace(model.cfg.train, dice_weight=0.0))
    cfg = dataclasses.replace(model.cfg.train, epochs=None, steps=2, val_every=2)
    result = train_head(model, labeled_items[:3], [], cfg, checkpoint=tmp_path / "mlp.pt", progress=False)
    assert result.history[-1]["step"] == 2
    loaded = load_checkpoint(tmp_path / "mlp.pt")
    assert isinstance(loaded.head.classifier, PixelMLPClassifier) and loaded.cfg.train.dice_weight == 0.0
    images = torch.rand(2, 1, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(images, ["a", "b"]), model.eval()(images, ["a", "b"]), atol=1e-5)
