"""`textdiff benchmark`: a run does not depend on what ran before it in the same process; healthy images."""

from __future__ import annotations

import dataclasses

import torch

import textdiff.benchmark as benchmark


def test_a_runs_initial_head_does_not_depend_on_the_methods_before_it(sample_dir, h, tmp_path, monkeypatch):
    real_train_head = benchmark.train_head
    initial_heads = []

    def recording_train_head(model, *args, **kwargs):
        initial_heads.append({k: v.clone() for k, v in model.head.state_dict().items()})
        return real_train_head(model, *args, **kwargs)

    monkeypatch.setattr(benchmark, "train_head", recording_train_head)
    for out, methods in (("alone", ("textdiff",)), ("after", ("unet", "empty_text", "textdiff"))):
        settings = benchmark.BenchmarkSettings(label_counts=(3,), seeds=(1,), steps=1, methods=methods)
        benchmark.run_benchmark(sample_dir, None, tmp_path / out, settings, h.tiny_config())
    # the textdiff runs: the first call, and the last call before the timing runs of the second benchmark
    alone, after = initial_heads[0], initial_heads[-3]
    assert alone.keys() == after.keys()
    assert all(torch.equal(alone[k], after[k]) for k in alone)


def test_healthy_label_adds_the_pools_healthy_images_with_empty_masks(sample_dir, h, tmp_path, monkeypatch):
    from textdiff.data import read_studies

    real_train_head = benchmark.train_head
    train_splits = []

    def recording_train_head(model, train, *args, **kwargs):
        train_splits.append(train)
        return real_train_head(model, train, *args, **kwargs)

    monkeypatch.setattr(benchmark, "train_head", recording_train_head)
    healthy = {c.id for c in read_studies(sample_dir / "train") if c.image_label == "normal"}
    runs = {}
    for name, label in (("plain", None), ("healthy", "normal")):
        train_splits.clear()
        settings = benchmark.BenchmarkSettings(label_counts=(2,), seeds=(0,), steps=1, methods=("textdiff",))
        cfg = h.tiny_config()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, healthy_label=label))
        benchmark.run_benchmark(sample_dir, None, tmp_path / name, settings, cfg)
        runs[name] = train_splits[0]
    drawn = {it["id"] for it in runs["plain"]}
    added = [it for it in runs["healthy"] if it["id"] not in drawn]
    assert healthy - drawn and {it["id"] for it in added} == healthy - drawn
    assert all(it["label"].sum() == 0 for it in added)
