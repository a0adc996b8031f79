"""Uncertainty and diversity for picking the next image to label, and the labeling simulation."""

import random

import torch

from textdiff.activelearning import image_embeddings, mask_uncertainty, pick_diverse, uncertainty_scores
from textdiff_bench.al_benchmark import choose
from textdiff.model.features import FeatureCache


def test_mask_uncertainty_is_zero_when_sure_and_one_when_undecided():
    sure = torch.zeros(1, 2, 4, 4)
    sure[:, 0] = 20.0
    undecided = torch.zeros(1, 2, 4, 4)
    scores = mask_uncertainty(torch.cat([sure, undecided]))
    assert scores[0] < 1e-6 and abs(scores[1] - 1.0) < 1e-6


def test_pick_diverse_takes_the_far_points_first_and_never_twice():
    candidates = torch.tensor([[0.0, 0.1], [0.0, 0.2], [5.0, 5.0], [-4.0, 0.0]])
    labeled = torch.tensor([[0.0, 0.0]])
    picks = pick_diverse(candidates, labeled, 3)
    assert picks[0] == 2 and picks[1] == 3 and len(set(picks)) == 3
    assert pick_diverse(candidates, torch.empty(0, 2), 10) and len(pick_diverse(candidates, labeled, 10)) == 4


def test_scores_and_embeddings_for_real_items(make_model, labeled_items):
    model = make_model()
    cache = FeatureCache(model.extractor)
    scores = uncertainty_scores(model, labeled_items, cache)
    assert len(scores) == len(labeled_items) and all(0 <= s <= 1 for s in scores)
    embeddings = image_embeddings(cache, labeled_items)
    assert embeddings.shape[0] == len(labeled_items)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(labeled_items)))


def test_each_strategy_picks_new_unlabeled_items(make_model, labeled_items):
    model = make_model()
    cache = FeatureCache(model.extractor)
    labeled, unlabeled = labeled_items[:2], labeled_items[2:]
    for strategy in ("random", "uncertainty", "diverse"):
        picked = choose(strategy, model, cache, labeled, unlabeled, 2, random.Random(0))
        ids = [item["id"] for item in picked]
        assert len(ids) == 2 and len(set(ids)) == 2
        assert set(ids) <= {item["id"] for item in unlabeled}


def test_labeling_simulation_writes_rounds_table_and_plot(tmp_path, h):
    """Tiny end-to-end run: every strategy shares round 0, adds `step` images per round, and writes its outputs."""
    import json

    from textdiff_bench.al_benchmark import LabelingSettings, run_labeling_benchmark
    from textdiff.data.sample_data import make_sample_data

    make_sample_data(tmp_path / "data", n_train=8, n_test=2, n_labeled=2, size=64)
    settings = LabelingSettings(start=2, step=2, rounds=2, seeds=(0,), steps=2)
    cfg = h.tiny_config()
    result = run_labeling_benchmark(tmp_path / "data", None, tmp_path / "out", settings, cfg)
    rows = result["rows"]
    assert [r["labels"] for r in rows if r["strategy"] == "diverse"] == [2, 4, 6]
    assert len({r["dice"] for r in rows if r["round"] == 0}) == 1  # the shared first round
    for strategy in settings.strategies:
        picked = [r["picked"] for r in rows if r["strategy"] == strategy][-1]
        assert len(set(picked)) == 6  # never the same image twice
    assert json.loads((tmp_path / "out" / "al_results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "out" / "al_dice_per_round.png").stat().st_size > 0


def test_al_summary_merges_runs_of_different_seeds(tmp_path, capsys):
    import json

    from textdiff_bench.cli import main

    for seed, dice in ((0, 0.5), (1, 0.7)):
        rows = [{"strategy": "random", "seed": seed, "round": 0, "labels": 5, "dice": dice, "picked": []},
                {"strategy": "random", "continued": True, "seed": seed, "round": 0, "labels": 5, "dice": dice + 0.1,
                 "picked": []}]
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "al_results.json").write_text(json.dumps({"rows": rows}))
    main(["al-summary", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(tmp_path / "all")])
    printed = capsys.readouterr().out
    assert "| random | 0.600 ± 0.100 |" in printed and "seeds: [0, 1]" in printed
    assert "| random, continued | 0.700 ± 0.100 |" in printed
    assert (tmp_path / "all" / "al_dice_per_round.png").is_file()


def test_a_continued_round_starts_from_the_last_rounds_head(tmp_path, h):
    """`continued` (the app's continue_from_current): with a learning rate of 0 the trained head keeps the weights
    it was given, so a round trained from a given head ends with exactly those weights; a new head does not."""
    import dataclasses

    import torch

    from textdiff.data.sample_data import make_sample_data
    from textdiff.data.studies import read_studies
    from textdiff_bench.benchmark import BenchmarkSettings, _masks, _Models, _pool, _split

    make_sample_data(tmp_path / "data", n_train=4, n_test=1, n_labeled=2, size=64)
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.0, epochs=None, steps=2, val_every=1))
    models = _Models(cfg, None, torch.device("cpu"))
    probe = models.model("textdiff")
    pool = [probe.load(c) for c in _pool(tmp_path / "data")]
    test = [probe.load(c) for c in read_studies(tmp_path / "data" / "test")]
    settings = BenchmarkSettings(steps=None, methods=("textdiff",), timing=False)
    split = _split(pool, set(), pool[:2], 0, models.cfg, settings, {})
    given = {k: torch.full_like(v, 0.01) if v.is_floating_point() else v for k, v in probe.head.state_dict().items()}

    _masks("textdiff", split, test, models, settings, 0, given)
    assert all(torch.equal(p, given[name]) for name, p in models.last["textdiff"].head.named_parameters())
    _masks("textdiff", split, test, models, settings, 0)
    assert not all(torch.equal(p, given[name]) for name, p in models.last["textdiff"].head.named_parameters())


def test_al_benchmark_continues_only_when_asked():
    from textdiff_bench.cli import build_parser

    assert build_parser().parse_args(["al-benchmark", "--continued"]).continued is True
    assert build_parser().parse_args(["al-benchmark"]).continued is False
    assert build_parser().parse_args(["al-benchmark", "--continued", "--gate"]).gate is True
    assert build_parser().parse_args(["al-benchmark"]).gate is False
    assert build_parser().parse_args(["al-benchmark", "--gate", "--left-out-runs", "3"]).left_out_runs == 3


def test_the_replayed_gate_keeps_the_model_in_service_when_the_new_one_scores_lower(tmp_path, h):
    """`--gate` replays the app's publish gate: a new model that marks nothing loses to one that marks everything
    on the held-out images (kept out), the other way round it is published."""
    import torch

    from textdiff.data.sample_data import make_sample_data
    from textdiff.model.features import FeatureCache
    from textdiff_bench.al_benchmark import publish_gate
    from textdiff_bench.benchmark import _Models, _pool

    make_sample_data(tmp_path / "data", n_train=4, n_test=1, n_labeled=4, size=64, normal_fraction=0.0)
    models = _Models(h.tiny_config(), None, torch.device("cpu"))
    cases = [c for c in _pool(tmp_path / "data") if c.label is not None]

    def marking(everything: bool):
        model = models.model("textdiff")
        last = [m for m in model.head.classifier.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        torch.nn.init.zeros_(last.weight)
        last.bias.data = torch.tensor([-5.0, 5.0] if everything else [5.0, -5.0])
        return model

    cache = FeatureCache(models.model("textdiff").extractor)
    gate = dict(labeled=cases, held_out=cases[:2], seen={c.id for c in cases[2:]}, cfg=models.cfg, cache=cache,
                device=torch.device("cpu"))
    kept = publish_gate(marking(False), marking(True), **gate)
    assert kept["compared_on"] == "held-out" and not kept["published"]
    assert kept["gate_dice"] == 0.0 < kept["service_gate_dice"]
    assert publish_gate(marking(True), marking(False), **gate)["published"]


def test_a_gated_round_that_is_not_published_reports_and_continues_from_the_last_model(tmp_path, h, monkeypatch):
    """A round the gate keeps out reports the model in service's test Dice, and the next round starts from it."""
    import dataclasses

    from textdiff.data.sample_data import make_sample_data
    from textdiff_bench import al_benchmark

    make_sample_data(tmp_path / "data", n_train=8, n_test=2, n_labeled=2, size=64)
    continued_from = []
    real_masks = al_benchmark._masks

    def masks(method, split, test, models, bench, seed, initial_head=None):
        continued_from.append(initial_head)
        return real_masks(method, split, test, models, bench, seed, initial_head)

    monkeypatch.setattr(al_benchmark, "_masks", masks)
    monkeypatch.setattr(al_benchmark, "publish_gate", lambda *args: {"published": False, "compared_on": "held-out"})
    settings = al_benchmark.LabelingSettings(start=2, step=2, rounds=2, seeds=(0,), steps=2, strategies=("random",),
                                             continued=True, gate=True)
    cfg = h.tiny_config()
    rows = al_benchmark.run_labeling_benchmark(tmp_path / "data", None, tmp_path / "out", settings, cfg)["rows"]
    assert [r["labels"] for r in rows] == [2, 4, 6] and [r.get("published") for r in rows] == [None, False, False]
    assert len({r["dice"] for r in rows}) == 1  # the first model stays in service
    first_head = continued_from[1]
    assert all(v.equal(first_head[k]) for k, v in continued_from[2].items())  # both retrains start from it
    assert "candidate_dice" in rows[1] and rows[1]["gate"] is True
    assert dataclasses.asdict(settings)["gate"] is True
