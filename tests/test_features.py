"""Feature cache (memory, disk, disabled) and feature-level augmentation."""

from pathlib import Path

import pytest
import torch

from textdiff.errors import FeaturesTooLarge
from textdiff.model.features import (
    LEFT_RIGHT_AXIS, FeatureCache, backbone_fingerprint, feature_augmentation, feature_keys, mirror_report,
)

SAMPLE_TRAIN = Path(__file__).resolve().parents[1] / "sample-data" / "train"


def _items(h, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"id": f"img{i}", "image": torch.rand(1, h.size, h.size, generator=gen) * 2 - 1} for i in range(n)]


def test_cached_features_equal_recomputed_ones(extractor, h):
    items = _items(h)
    cache = FeatureCache(extractor, batch_size=2)
    cache.fill(items, progress=False)
    for item in items:
        cached = cache.get(item)
        fresh = extractor(item["image"][None])
        assert len(cached) == len(fresh)
        for c, f in zip(cached, fresh):
            assert c.dtype == torch.float16
            assert c.shape == f.shape[1:]
            scale = f.abs().max().item()
            torch.testing.assert_close(c.float(), f[0], rtol=1e-2, atol=1e-2 * scale)


def test_memory_cache_computes_each_image_once(extractor, h):
    items = _items(h, n=3, seed=1)
    cache = FeatureCache(extractor, batch_size=2)
    calls, handle = h.count_calls(extractor)
    try:
        cache.fill(items, progress=False)
        assert calls == [2, 1]  # batched in chunks of batch_size
        cache.fill(items, progress=False)
        for item in items:
            cache.get(item)
        assert calls == [2, 1]
        new = _items(h, n=1, seed=2)[0] | {"id": "new"}
        cache.get(new)  # a miss computes (and stores) just that image
        cache.get(new)
        assert calls == [2, 1, 1]
    finally:
        handle.remove()


def test_disk_cache_round_trips_without_the_extractor(extractor, h, tmp_path):
    items = _items(h, n=2, seed=3)
    first = FeatureCache(extractor, folder=tmp_path / "cache")
    first.fill(items, progress=False)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == ["img0.pt", "img1.pt"]  # no leftover temporary files
    second = FeatureCache(extractor, folder=tmp_path / "cache")
    calls, handle = h.count_calls(extractor)
    try:
        second.fill(items, progress=False)
        loaded = [second.get(item) for item in items]
    finally:
        handle.remove()
    assert calls == []
    for item, features in zip(items, loaded):
        for a, b in zip(first.get(item), features):
            assert torch.equal(a, b)


def test_disk_cache_is_keyed_by_backbone(extractor, h, tmp_path):
    from textdiff.model.backbone import make_extractor

    other = make_extractor(h.tiny_backbone(init_seed=1))
    assert backbone_fingerprint(other) != backbone_fingerprint(extractor)
    assert backbone_fingerprint(make_extractor(h.tiny_backbone(timesteps=(10, 50)))) != backbone_fingerprint(extractor)
    items = _items(h, n=1, seed=4)
    FeatureCache(extractor, folder=tmp_path).fill(items, progress=False)
    calls, handle = h.count_calls(other)
    try:
        FeatureCache(other, folder=tmp_path).fill(items, progress=False)
    finally:
        handle.remove()
    assert calls == [1]  # features of a different backbone are not reused


def test_disabled_cache_recomputes_every_time(extractor, h):
    items = _items(h, n=1, seed=5)
    cache = FeatureCache(extractor, enabled=False)
    calls, handle = h.count_calls(extractor)
    try:
        cache.fill(items, progress=False)
        assert calls == []
        a, b = cache.get(items[0]), cache.get(items[0])
    finally:
        handle.remove()
    assert calls == [1, 1]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _pattern_sample(seed):
    """Feature maps that are the (block-constant) mask itself at two scales."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(1, 8, 8, generator=gen) > 0.5).float()
    coarse[0, 0, 0], coarse[0, 0, 7], coarse[0, 7, 0], coarse[0, 7, 7] = 1, 0, 0, 0  # not symmetric
    fine = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return {"feature0": coarse.repeat(3, 1, 1), "feature1": fine.repeat(2, 1, 1), "label": fine.long()}


@pytest.mark.parametrize("mode", ["flip", "rot90_flip"])
def test_augmentation_moves_features_and_mask_together(mode):
    augment = feature_augmentation(mode, 2, seed=0)
    changed = 0
    for draw in range(12):
        sample = _pattern_sample(draw)
        out = augment(dict(sample))
        f0, f1, label = (torch.as_tensor(out[k]) for k in ("feature0", "feature1", "label"))
        assert f0.shape == (3, 8, 8) and f1.shape == (2, 16, 16) and label.shape == (1, 16, 16)
        for c in range(3):
            assert torch.equal(f0[c], label[0, ::2, ::2].float())
        for c in range(2):
            assert torch.equal(f1[c], label[0].float())
        changed += not torch.equal(label, sample["label"])
    assert changed > 0  # some draws did transform


def test_rot90_mode_rotates_and_seed_is_reproducible():
    sample = _pattern_sample(0)
    base = sample["label"][0]
    flips = {torch.flip(base, d).numpy().tobytes() for d in [(0,), (1,), (0, 1)]} | {base.numpy().tobytes()}

    def run(seed):
        augment = feature_augmentation("rot90_flip", 2, seed=seed)
        return [torch.as_tensor(augment(dict(sample))["label"])[0] for _ in range(16)]

    first, second = run(3), run(3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(a.numpy().tobytes() not in flips for a in first)  # a transposition happened: rotation, not only flips


def test_mirror_report_swaps_sides_and_keeps_the_rest():
    report = "Bilateral pulmonary infection, two infected areas, upper Left lung and lower right lung."
    assert mirror_report(report) == "Bilateral pulmonary infection, two infected areas, upper Right lung and lower left lung."
    assert mirror_report("RIGHT upper lobe; leftover text") == "LEFT upper lobe; leftover text"  # whole words only
    assert mirror_report(mirror_report(report)) == report
    assert mirror_report("No pulmonary infection.") == "No pulmonary infection."


def test_mirror_flips_left_right_with_the_report_and_nothing_else():
    augment = feature_augmentation("mirror", 2, seed=0)
    mirrored = kept = 0
    for draw in range(16):
        sample = {**_pattern_sample(draw), "report": "Infection, lower left lung."}
        out = augment(dict(sample))
        label = torch.as_tensor(out["label"])
        if out["report"] == "Infection, lower right lung.":
            assert torch.equal(label, torch.flip(sample["label"], (1 + LEFT_RIGHT_AXIS,)))
            assert torch.equal(torch.as_tensor(out["feature0"]), torch.flip(sample["feature0"], (1 + LEFT_RIGHT_AXIS,)))
            mirrored += 1
        else:
            assert out["report"] == sample["report"] and torch.equal(label, sample["label"])
            kept += 1
    assert mirrored and kept  # a fair coin per sample


def test_mirror_axis_runs_across_the_patient():
    """On the sample data the reports' 'right lung' lies at small X: a flip on LEFT_RIGHT_AXIS swaps the sides."""
    from textdiff.data.studies import load_case, read_studies

    sides = {}
    for case in read_studies(SAMPLE_TRAIN):
        if case.label is None or "Unilateral" not in case.report:
            continue
        label = load_case(case, 64, 1, 2)["label"][0]
        where = label.nonzero()[:, LEFT_RIGHT_AXIS].float().mean().item() / label.shape[LEFT_RIGHT_AXIS]
        sides.setdefault("left" if "left lung" in case.report else "right", []).append(where)
    assert sides["right"] and sides["left"]
    assert max(sides["right"]) < 0.5 < min(sides["left"])


def test_none_augmentation_is_identity():
    sample = _pattern_sample(1)
    out = feature_augmentation("none", 2, seed=0)(dict(sample))
    for key in sample:
        assert torch.equal(torch.as_tensor(out[key]), sample[key])


def test_invalid_augmentation_mode_raises():
    with pytest.raises(ValueError, match="augment must be one of"):
        feature_augmentation("rotate", 2, seed=0)


def test_feature_keys():
    assert feature_keys(3) == ["feature0", "feature1", "feature2"]


def test_disk_cache_holds_plain_tensors_for_loaded_images(extractor, labeled_items, tmp_path):
    """Images loaded by MONAI are MetaTensors; their cached features must still load back (weights_only)."""
    items = labeled_items[:2]
    FeatureCache(extractor, folder=tmp_path / "cache").fill(items, progress=False)
    reloaded = FeatureCache(extractor, folder=tmp_path / "cache")
    for item in items:
        features = reloaded.get(item)
        assert all(type(f) is torch.Tensor for f in features)


def test_cache_past_its_memory_limit_keeps_features_on_disk_or_refuses(extractor, h, tmp_path, caplog):
    """A large backbone's features must not exhaust memory: on disk only with a folder, a clear refusal without."""
    items = _items(h, n=3, seed=6)
    per_window_gb = sum(2 * c * h * w for c, h, w in extractor.feature_shapes) / 2**30
    with pytest.raises(FeaturesTooLarge, match="3 windows take .* over the feature cache's limit.*max_feature_cache_gb"):
        FeatureCache(extractor, max_memory_gb=2.5 * per_window_gb).fill(items, progress=False)
    spilled = FeatureCache(extractor, folder=tmp_path, max_memory_gb=2.5 * per_window_gb)
    with caplog.at_level("WARNING"):
        spilled.fill(items, progress=False)
    assert "kept on disk" in caplog.text and not spilled._memory
    reference = FeatureCache(extractor)
    reference.fill(items, progress=False)
    for item in items:
        assert all(torch.equal(a, b) for a, b in zip(spilled.get(item), reference.get(item)))
    assert not spilled._memory  # read back from disk, not kept
