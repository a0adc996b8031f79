"""`textdiff benchmark`: a run does not depend on what ran before it in the same process."""

from __future__ import annotations

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
