"""Background jobs yield the CPU to requests (nothing else does); scoring and active learning before the first model
are quiet and still useful."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "apps" / "textdiff"))
from lib import jobs  # noqa: E402


def test_only_monai_labels_job_process_lowers_its_priority(monkeypatch):
    threads, niceness = torch.get_num_threads(), os.nice(0)
    jobs.yield_to_requests(19, 1)  # pytest is not a job process
    assert (torch.get_num_threads(), os.nice(0)) == (threads, niceness)

    calls = []
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", types.SimpleNamespace(name=jobs.JOB_MODULE),
                        raising=False)
    monkeypatch.setattr(jobs.os, "nice", lambda step: calls.append(("nice", step)) or niceness + step)
    monkeypatch.setattr(jobs.torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    assert jobs.in_job_process()
    jobs.yield_to_requests(19, 1)
    assert ("nice", 19 - niceness) in calls and ("threads", 1) in calls


def test_scoring_before_any_model_exists_scores_nothing_and_says_so(tmp_path, caplog):
    """MONAI Label scores at start-up; on a fresh server that must be a line in the log, not a traceback."""
    from lib.model_store import ModelStore
    from lib.scoring.uncertainty import MaskUncertainty

    scoring = MaskUncertainty(ModelStore(tmp_path / "textdiff.pt", "cpu"), tmp_path / "cache")
    with caplog.at_level("INFO"):
        assert scoring({}, datastore=None) == {"scored": 0, "skipped": []}
    assert "no textdiff model yet" in caplog.text


def test_uncertainty_before_any_model_picks_an_image_not_known_to_be_normal(tmp_path):
    from lib.activelearning.uncertainty import Uncertainty
    from lib.model_store import ModelStore
    from lib.scoring.uncertainty import MaskUncertainty

    class Store:
        def get_unlabeled_images(self):
            return ["a", "b", "c"]

        def image_labels(self):
            return {"a": "normal", "c": "normal"}

    strategy = Uncertainty(MaskUncertainty(ModelStore(tmp_path / "textdiff.pt", "cpu"), tmp_path, "normal"))
    assert {strategy({}, Store())["id"] for _ in range(5)} == {"b"}
