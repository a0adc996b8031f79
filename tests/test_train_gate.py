"""The quality gate: a run with pseudo-labels or synthetic copies also trains without them and keeps the better."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from textdiff.data.studies import read_studies
from textdiff.model.segmenter import load_checkpoint
from textdiff.training.runs import train_on_cases


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """12 images of bright discs (an easy task a tiny model learns in a few epochs), 5 with a drawn mask; every true
    mask kept aside, to make right and wrong pseudo-labels of the other 7."""
    out = tmp_path_factory.mktemp("gate")
    studies = out / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    rng, (yy, xx) = np.random.default_rng(0), np.mgrid[:64, :64]
    truths = {}
    for index in range(12):
        mask = np.zeros((64, 64), bool)
        for _ in range(2):
            cy, cx, r = rng.integers(12, 52), rng.integers(12, 52), rng.integers(5, 10)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = np.clip(40 + 150 * mask + rng.normal(0, 15, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(studies / f"img_{index:02d}.png")
        truths[f"img_{index:02d}"] = mask
        if index < 5:
            Image.fromarray(mask.astype(np.uint8)).save(studies / "labels" / "final" / f"img_{index:02d}.png")
    return studies, truths


def _pseudo(pool, tmp_path, wrong: bool):
    """A pseudo-label for every image without a drawn mask: its true mask, or the true mask turned upside down
    and mirrored (regions where there are none)."""
    studies, truths = pool
    folder = tmp_path / ("wrong" if wrong else "right")
    folder.mkdir()
    pseudo = []
    for case in (c for c in read_studies(studies) if c.label is None):
        mask = truths[case.id][::-1, ::-1] if wrong else truths[case.id]
        Image.fromarray(mask.astype(np.uint8)).save(folder / f"{case.id}.png")
        pseudo.append(dataclasses.replace(case, label=folder / f"{case.id}.png"))
    return pseudo


def _real(pool):
    return [c for c in read_studies(pool[0]) if c.label is not None]


def _config(h):
    cfg = h.tiny_config()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=12, val_fraction=0.4, min_val_images=1, seed=1))


def test_wrong_pseudo_labels_are_dropped_and_the_run_without_them_is_kept(pool, h, tmp_path):
    real = _real(pool)
    checkpoint = tmp_path / "m.pt"
    model, result = train_on_cases(real, _config(h), checkpoint, progress=False,
                                   pseudo_cases=_pseudo(pool, tmp_path, wrong=True), compare_without=True)
    gate = result.gate
    assert gate["kept"] == "without pseudo-labels" and gate["dice_without"] > gate["dice_with"]
    assert gate["compared_on"] == "held-out images"
    assert result.best_dice == pytest.approx(gate["dice_without"], abs=1e-4)
    # the checkpoint is the kept run, and nothing else is left next to it
    assert [p.name for p in tmp_path.glob("m*.pt")] == ["m.pt"]
    assert torch.load(checkpoint, weights_only=True)["best_val_dice"] == pytest.approx(gate["dice_without"], abs=1e-4)
    loaded = load_checkpoint(checkpoint)
    assert all(torch.equal(v, loaded.head.state_dict()[k]) for k, v in model.head.state_dict().items())


def test_right_pseudo_labels_are_kept(pool, h, tmp_path):
    real = _real(pool)
    _, result = train_on_cases(real, _config(h), tmp_path / "m.pt", progress=False,
                               pseudo_cases=_pseudo(pool, tmp_path, wrong=False), compare_without=True)
    assert result.gate["kept"] == "with pseudo-labels"
    assert result.gate["dice_with"] > result.gate["dice_without"]


def test_with_nothing_held_out_the_gate_says_it_compared_on_the_training_images(pool, h, tmp_path):
    cfg = _config(h)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, min_val_images=100))
    _, result = train_on_cases(_real(pool), cfg, tmp_path / "m.pt", progress=False,
                               pseudo_cases=_pseudo(pool, tmp_path, wrong=True), compare_without=True)
    assert result.gate["compared_on"] == "training images"
    assert result.judged_on == "training" and "the last" in result.kept


def test_no_gate_without_extras_or_when_not_asked(pool, h, tmp_path):
    real = _real(pool)
    _, plain = train_on_cases(real, _config(h), tmp_path / "a.pt", progress=False, compare_without=True)
    assert plain.gate is None
    _, unchecked = train_on_cases(real, _config(h), tmp_path / "b.pt", progress=False,
                                  pseudo_cases=_pseudo(pool, tmp_path, wrong=True))
    assert unchecked.gate is None


def test_validation_never_holds_pseudo_labeled_images(pool, h, monkeypatch, tmp_path):
    """Also when the held-out images have no foreground and the best epoch is chosen on training images."""
    import textdiff.training.train as train_module

    chosen = []
    original = train_module.selection_items

    def spy(val_items, train_items):
        chosen.append({item["id"] for item in original(val_items, train_items)})
        return original(val_items, train_items)

    monkeypatch.setattr(train_module, "selection_items", spy)
    real = _real(pool)
    pseudo = _pseudo(pool, tmp_path, wrong=False)
    cfg = dataclasses.replace(_config(h), train=dataclasses.replace(_config(h).train, val_fraction=0.0, epochs=1))
    train_on_cases(real, cfg, tmp_path / "m.pt", progress=False, pseudo_cases=pseudo, compare_without=True)
    assert len(chosen) == 2 and all(ids == {c.id for c in real} for ids in chosen)


def test_both_runs_start_from_the_same_head(pool, h, monkeypatch, tmp_path):
    import textdiff.training.options.extra_labels as gate_module
    import textdiff.training.runs as train_module

    starts = []
    original = train_module.train_head

    def spy(model, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.head.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_head", spy)
    monkeypatch.setattr(gate_module, "train_head", spy)
    cfg = dataclasses.replace(_config(h), train=dataclasses.replace(_config(h).train, epochs=1))
    train_on_cases(_real(pool), cfg, tmp_path / "m.pt", progress=False, pseudo_cases=_pseudo(pool, tmp_path, True),
                   compare_without=True)
    assert len(starts) == 2 and all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
