"""Report supervision: the sides a report names become a partial mask for images nobody drew one for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from textdiff.config import TrainConfig
from textdiff.model.features import FeatureCache, mirror_report
from textdiff.model.report_supervision import named_sides, obey_reports, report_loss, side_region, side_slice
from textdiff.model.segmenter import predict_logits
from textdiff.training.options.reports import report_items
from textdiff.training.train import train_head

LEFT = "Unilateral pulmonary infection, one infected area, lower left lung."
BOTH = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def test_named_sides_reads_lvit_reports():
    assert named_sides(LEFT) == {"left"}
    assert named_sides(mirror_report(LEFT)) == {"right"}
    assert named_sides(BOTH) == {"left", "right"}
    assert named_sides("Bilateral pulmonary infection, three infected areas.") == {"left", "right"}
    assert named_sides("No pulmonary infection.") == frozenset()  # nothing anywhere
    assert named_sides("") is None and named_sides("Pulmonary infection, one infected area.") is None


def _logits_with_foreground(x_range: slice, size: int = 16) -> torch.Tensor:
    """One image's logits (1, 2, X, Y): foreground confidently inside x_range, background elsewhere."""
    logits = torch.zeros(1, 2, size, size)
    logits[:, 0] = 5.0
    logits[:, 0, x_range] = -5.0
    return logits


def test_report_loss_is_low_only_where_the_mask_obeys_the_report():
    size = 16
    on_patient_left = _logits_with_foreground(slice(12, 14), size)  # high x: the patient's left
    on_patient_right = _logits_with_foreground(slice(2, 4), size)
    left = [frozenset({"left"})]
    assert report_loss(on_patient_left, left, top_k=4) < 0.01
    assert report_loss(on_patient_right, left, top_k=4) > 1.0  # the named lung is empty, the other is not
    assert report_loss(on_patient_left, [frozenset()], top_k=4) > 0.3  # a healthy report: no foreground at all
    assert report_loss(torch.full((1, 2, size, size), 0.0).index_fill(1, torch.tensor([0]), 5.0),
                       [frozenset()], top_k=4) < 0.01
    # the central band is not scored: a finding there obeys any report
    assert report_loss(_logits_with_foreground(slice(7, 9), size), [frozenset()], top_k=4) < 0.01
    assert side_slice("left", size) == slice(9, 16) and side_slice("right", size) == slice(0, 7)
    with pytest.raises(ValueError, match="2 images but 1"):
        report_loss(torch.zeros(2, 2, size, size), left, top_k=4)


def test_report_loss_gradient_moves_foreground_to_the_named_side():
    logits = torch.zeros(1, 2, 16, 16, requires_grad=True)
    report_loss(logits, [frozenset({"left"})], top_k=4).backward()
    foreground_push = -logits.grad[0, 1]  # > 0 where a step raises the foreground logit
    assert (foreground_push[side_slice("right", 16)] < 0).all()
    assert foreground_push[side_slice("left", 16)].max() > 0
    assert (foreground_push[7:9] == 0).all()


def _unlabeled(items: list[dict], report: str) -> list[dict]:
    return [{**item, "id": f"pool-{item['id']}", "label": None, "report": report} for item in items]


def test_training_with_reports_of_unlabeled_images_obeys_them(make_model, labeled_items):
    """The pool's reports all say "left": trained with them, the model's foreground on those images leaves the
    patient's right lung and lies mostly on the left, which the same training without them does not do."""
    pool = _unlabeled(labeled_items, LEFT)
    foreground = {}
    for weight in (0.0, 5.0):
        model = make_model(seed=1)
        cfg = dataclasses.replace(model.cfg.train, epochs=6, report_weight=weight, report_top_k=4)
        result = train_head(model, labeled_items[:3], [], cfg, progress=False, unlabeled=pool)
        assert result.report_images == (len(pool) if weight else 0)
        probability = predict_logits(model, pool, FeatureCache(model.extractor)).softmax(1)[:, 1]
        size = probability.shape[1]
        foreground[weight] = {side: probability[:, side_slice(side, size)].mean().item() for side in ("left", "right")}
    assert foreground[5.0]["right"] < 0.1 * foreground[5.0]["left"]
    ratio = {weight: f["left"] / f["right"] for weight, f in foreground.items()}
    assert ratio[5.0] > 3 * ratio[0.0]


def test_empty_reports_leave_training_as_it_was(make_model, labeled_items):
    """The empty-report ablation gets no report supervision: images whose report is empty change nothing."""
    histories = []
    for unlabeled in ([], _unlabeled(labeled_items, "")):
        model = make_model(seed=2)
        cfg = dataclasses.replace(model.cfg.train, epochs=2, report_weight=1.0)
        result = train_head(model, labeled_items[:3], [], cfg, progress=False, unlabeled=unlabeled)
        assert result.report_images == 0
        histories.append(result.history)
    assert [r["loss"] for r in histories[0]] == [r["loss"] for r in histories[1]]
    assert report_items(_unlabeled(labeled_items, "") + labeled_items) == []  # drawn masks are not "unlabeled"


def test_report_supervision_config_is_checked():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="report_weight >= 0"):
            TrainConfig(report_weight=bad)
    with pytest.raises(ValueError, match="report_top_k >= 1"):
        TrainConfig(report_top_k=0)
    with pytest.raises(ValueError, match="'none' or 'mirror'"):
        TrainConfig(report_weight=0.5, augment="rot90_flip")
    assert TrainConfig(report_weight=0.5, augment="mirror").report_weight == 0.5


def test_train_on_cases_passes_the_reports_of_images_without_a_mask(sample_dir, h, monkeypatch, tmp_path):
    """Images without a final label train through their reports, unless they already train as healthy images, and
    only when train.report_weight is on."""
    import textdiff.training.runs as train_module
    from textdiff.training.options.extra_labels import healthy_cases
    from textdiff.data.studies import read_studies

    seen = {}

    def spy(model, train_items, val_items, cfg, unlabeled=(), **kwargs):
        seen["unlabeled"] = unlabeled
        return train_module.TrainResult([], 0.0, 0)

    monkeypatch.setattr(train_module, "train_head", spy)
    cases = read_studies(sample_dir / "train")
    drawn, pool = cases[:2], [dataclasses.replace(c, label=None) for c in cases[2:]]
    healthy = healthy_cases(pool, "normal")
    cfg = h.tiny_config()
    on = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, report_weight=0.5))
    train_module.train_on_cases(drawn, on, tmp_path / "m.pt", healthy=healthy, unlabeled=pool + drawn, progress=False)
    expected = {c.id for c in pool} - {c.id for c in healthy}
    assert expected and {it["id"] for it in seen["unlabeled"]} == expected
    assert all(it["label"] is None and named_sides(it["report"]) is not None for it in seen["unlabeled"])
    train_module.train_on_cases(drawn, cfg, tmp_path / "m.pt", unlabeled=pool, progress=False)
    assert list(seen["unlabeled"]) == []


def test_obey_reports_erases_only_what_the_report_rules_out():
    size = 16
    logits = torch.zeros(4, 3, size, size)
    logits[:, 0] = -1.0  # foreground (classes 1 and 2 tie, argmax 1) everywhere
    reports = [LEFT, "No pulmonary infection.", "", BOTH]
    labels = obey_reports(logits, reports).argmax(1)
    assert (labels[0][side_region("right", size)] == 0).all() and (labels[0][side_region("left", size)] == 1).all()
    assert (labels[0][7:9] == 1).all()  # the central band is left alone
    assert (labels[1] == 0).all()  # no finding: nothing anywhere
    assert (labels[2] == 1).all() and (labels[3] == 1).all()  # an empty report, or both sides named: unchanged
    assert torch.isfinite(obey_reports(logits, reports).softmax(1)).all()
    with pytest.raises(ValueError, match="4 images but 1 reports"):
        obey_reports(logits, [LEFT])


def test_obey_reports_draws_the_most_likely_area_of_a_named_lung_the_mask_left_empty():
    size = 16
    logits = torch.zeros(2, 2, size, size)
    logits[:, 0] = 4.0  # background everywhere ...
    logits[:, 1, 11:13, 3:5] = 3.0  # ... but a faint area in the patient's left lung (high x)
    logits[:, 1, 2:4, 3:5] = 3.5  # and a fainter-than-background one in the right lung
    labels = obey_reports(logits, [LEFT, ""]).argmax(1)
    expected = torch.zeros(size, size, dtype=torch.long)
    expected[11:13, 3:5] = 1
    assert torch.equal(labels[0], expected)  # the named lung gets its area; the other lung stays empty
    assert not labels[1].any()  # an empty report adds nothing
    drawn = logits.clone()
    drawn[0, 1, 14, 10] = 9.0  # the left lung already has an area: nothing else is added
    assert obey_reports(drawn, [LEFT, ""]).argmax(1)[0].sum() == 1


def test_model_obeys_the_report_outside_training_only(make_model, labeled_items):
    model = make_model(obey_report=True)
    features = [f[None] for f in FeatureCache(model.extractor).get(labeled_items[0])]
    free = make_model(obey_report=False)
    free.head.load_state_dict(model.head.state_dict())
    for mode in (True, False):
        model.train(mode), free.train(mode)
        with torch.no_grad():
            obeyed, raw = (m.logits_from_features(features, ["No pulmonary infection."]) for m in (model, free))
        if mode:
            torch.testing.assert_close(obeyed, raw)
        else:
            assert (obeyed.argmax(1) == 0).all() and not torch.equal(obeyed, raw)


def test_lung_rules_refuse_reports_that_name_no_lung(make_model, labeled_items):
    """A MoNuSeg report names "the lower left" of a tissue tile: the lung rules must say so, not read it as a lung."""
    assert named_sides("The nuclei density in the lower left is high.") is None
    tissue = [{**item, "report": "The nuclei density in the lower left is high."} for item in labeled_items]
    model = make_model(obey_report=True)
    with pytest.raises(ValueError, match="head.obey_report reads which lungs"):
        train_head(model, tissue[:3], [], dataclasses.replace(model.cfg.train, epochs=1), progress=False)
    model = make_model()
    cfg = dataclasses.replace(model.cfg.train, epochs=1, report_weight=1.0)
    with pytest.raises(ValueError, match="train.report_weight reads which lungs"):
        train_head(model, labeled_items[:3], [], cfg, progress=False, unlabeled=_unlabeled(tissue, tissue[0]["report"]))
