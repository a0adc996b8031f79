"""The publish gate judges a new model on images it did not train on, and the model in service on images it did not
see either, where there are any (`textdiff.training.comparison`)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from textdiff.data.studies import Case
from textdiff.training import comparison
from textdiff.training.comparison import comparison_basis

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "textdiff"))
from app_fixtures import in_process_client, make_deployment  # noqa: E402


def _cases(n: int) -> list[Case]:
    return [Case(f"case_{i}", Path(f"case_{i}.png"), Path(f"label_{i}.png")) for i in range(n)]


def test_the_basis_is_held_out_images_else_labels_new_to_the_model_in_service_else_what_both_saw():
    labeled = _cases(5)
    held = comparison_basis(labeled, labeled[:2], {"case_0", "case_2"}, 3)
    assert held.kind == "held-out" and [c.id for c in held.cases] == ["case_1"]  # held out, never seen by either
    left = comparison_basis(labeled, [], {c.id for c in labeled[:4]}, 3)
    assert left.kind == "left-out" and [c.id for c in left.cases] == ["case_4"]
    capped = comparison_basis(labeled, [], set(), 2)
    assert capped.kind == "left-out" and len(capped.cases) == 2
    assert comparison_basis(labeled, [], {c.id for c in labeled}, 3).kind == "seen"  # nothing new to it
    unknown = comparison_basis(labeled, [], None, 3)
    assert unknown.kind == "seen" and unknown.cases == labeled and "nothing is recorded" in unknown.says


def test_both_models_are_scored_on_the_same_images_and_a_left_out_run_stands_for_the_new_recipe():
    labeled, runs = _cases(3), []
    new = lambda cases: 0.9  # noqa: E731 - the new model as trained
    old = lambda cases: 0.5 + 0.1 * len(cases)  # noqa: E731 - the model in service, by how many images it is scored on
    left_out = lambda: runs.append(1) or {"case_2": 0.4}  # noqa: E731 - case_1 could not be left out
    basis = comparison_basis(labeled, [], {"case_0"}, 2)
    verdict = comparison.compare_on_basis(basis, new, old, left_out)
    assert [c.id for c in verdict.cases] == ["case_2"] and verdict.by_left_out_runs
    assert (verdict.new, verdict.old, verdict.better) == (0.4, pytest.approx(0.6), False)
    held = comparison.compare_on_basis(comparison_basis(labeled, labeled[:1], {"case_0"}, 2), new, old, left_out)
    assert (held.new, held.better, held.by_left_out_runs) == (0.9, True, False) and len(runs) == 1
    nothing_in_service = comparison.compare_on_basis(basis, new, lambda cases: None, left_out)
    assert nothing_in_service.better and nothing_in_service.new == 0.9 and len(runs) == 1  # no extra run to beat none


class _Memorizer:
    """A deliberately worse model: perfect on the images it trained on, poor on any other (what a run that
    overfits its few labels looks like); the model in service scores 0.7 on every image."""

    def __init__(self, trained_on: set[str]):
        self.trained_on = trained_on
        self.cfg = type("Cfg", (), {"train": type("Train", (), {"volume_slices": "all"})(),
                                    "head": type("Head", (), {"label_names": ("background", "infection")})()})()


def _dice(model, cases, volume_slices="all") -> float:
    scores = [1.0 if c.id in model.trained_on else 0.2 for c in cases] if isinstance(model, _Memorizer) else [0.7] * len(cases)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("gate", ["old", "new"])
def test_a_worse_candidate_on_5_labels_is_refused_by_the_new_gate_and_was_accepted_by_the_old(gate, tmp_path,
                                                                                              monkeypatch):
    """The model in service learned 4 labels; the candidate learned those and a 5th by heart. Judged on the labeled
    images (the old gate, which is what the new one falls back to when it knows nothing of the model in service) it
    wins; judged on the 5th label left out of a run of its recipe, it loses."""
    from lib import publish

    labeled = _cases(5)
    current = tmp_path / "textdiff.pt"
    publish.candidate_path(current).write_bytes(b"candidate")
    current.write_bytes(b"in service")
    monkeypatch.setattr(publish, "dice_on_cases", _dice)
    monkeypatch.setattr(publish, "current_dice", lambda path, cases, *args: _dice(None, cases))
    monkeypatch.setattr(comparison, "dice_on_cases", _dice)
    monkeypatch.setattr(comparison, "train_on_cases",
                        lambda cases, *args, **kwargs: (_Memorizer({c.id for c in cases}), None))
    seen = None if gate == "old" else {c.id for c in labeled[:4]}
    basis = comparison_basis(labeled, [], seen, 3)
    candidate = _Memorizer({c.id for c in labeled})

    def left_out() -> dict[str, float]:
        return comparison.left_out_dice(candidate.cfg, labeled, basis.cases, "cpu", None)

    decision = publish.publish_if_better(candidate, current, basis, "cpu", False, left_out)
    assert decision["published"] is (gate == "old")
    assert decision["current_validation_dice"] == 0.7
    if gate == "new":
        assert decision["compared_on"] == ["case_4"] and decision["validation_dice"] == 0.2
        assert "never saw" in decision["compared_on_images"]
        assert current.read_bytes() == b"in service"  # kept
    else:
        assert decision["validation_dice"] == 1.0 and "both models may have trained on" in decision["compared_on_images"]


def test_a_retrain_after_a_new_label_is_judged_on_it_left_out(tmp_path, h):
    """Through the app: a run records what it read; after one more label, the next run's gate compares on that
    label, left out of one extra run, and says so in the train stats (and so in /info)."""
    deployment = make_deployment(tmp_path, h.tiny_config)
    with in_process_client(deployment) as client:
        first = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 2, "force": True})
        assert first.status_code == 200, first.text
        seen = torch.load(deployment["model_dir"] / "textdiff.pt", weights_only=True)["seen_images"]
        assert len(seen) >= 4 and "case_0005" not in seen
        truth = np.array(Image.open(deployment["groundtruth"] / "case_0005.png"))
        buffer = io.BytesIO()
        Image.fromarray(truth).save(buffer, format="PNG")
        saved = client.put("/datastore/label?image=case_0005&tag=final",
                           files={"label": ("case_0005.png", buffer.getvalue(), "image/png")})
        assert saved.status_code == 200, saved.text
        second = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 2})
        assert second.status_code == 200, second.text
        stats = client.get("/info/").json()["train_stats"]["textdiff"]
        assert stats["compared_on"] == ["case_0005"] and "never saw" in stats["compared_on_images"]
        assert stats["comparison_seconds"] > 0 and stats["labeled_images"] == 5
        assert stats["checkpoint"] == "round 2 of 2, the last"  # nothing held out: its training images do not choose


def test_a_label_that_cannot_be_left_out_is_skipped_and_the_new_model_then_scored_as_trained(tmp_path, monkeypatch):
    """Leaving out the only label with foreground leaves nothing to train on: no left-out score, so the gate says it
    scored the new model on what it trained on instead of failing the run."""
    from lib import publish
    from textdiff.errors import DataError

    def refuse(*args, **kwargs):
        raise DataError("every mask is empty: draw at least one region to segment")

    monkeypatch.setattr(comparison, "train_on_cases", refuse)
    labeled = _cases(2)
    assert comparison.left_out_dice(_Memorizer(set()).cfg, labeled, labeled[1:], "cpu", None) == {}
    current = tmp_path / "textdiff.pt"
    publish.candidate_path(current).write_bytes(b"candidate")
    current.write_bytes(b"in service")
    monkeypatch.setattr(publish, "dice_on_cases", _dice)
    monkeypatch.setattr(publish, "current_dice", lambda path, cases, *args: _dice(None, cases))
    basis = comparison_basis(labeled, [], {"case_0"}, 3)
    decision = publish.publish_if_better(_Memorizer({"case_0", "case_1"}), current, basis, "cpu", False, lambda: {})
    assert decision["published"] and "as trained" in decision["compared_on_images"]
