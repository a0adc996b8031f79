"""`textdiff profile` and `textdiff time-to-model`: the speed tools run on tiny models and say what they measured."""

from __future__ import annotations

import dataclasses
import json

from textdiff.model.backbone import build_scheduler, build_unet, save_diffusion
from textdiff.research.profile import profile_pretraining, run_profile
from textdiff.research.time_to_model import TimeToModelSettings, run_time_to_model


def test_profile_splits_a_head_run_and_a_pretraining_epoch_into_phases(sample_dir, h, tmp_path, capsys):
    cfg = h.tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=None, steps=4, val_every=2))
    result = run_profile(sample_dir / "train", cfg, labels=3, pretrain_epochs=1, pretrain_batch_size=2,
                         out=tmp_path / "profile.json")
    head, pretraining = result["head"], result["pretraining"]
    assert head["steps"] == 4 and head["rounds"] == 2 and head["images"] == 3
    for phase in ("feature extraction (backbone)", "fusion forward (reductions, cross-attention, upsampling)",
                  "classifier backward", "loss forward and backward", "optimizer step",
                  "validation (after each round), checkpoint choice"):
        assert head["seconds"][phase] > 0, phase
    assert sum(head["seconds"].values()) <= head["total_s"] * 1.05  # the phases do not count any second twice
    assert pretraining["seconds"]["UNet backward, gradient clipping"] > 0
    assert json.loads((tmp_path / "profile.json").read_text()).keys() == {"head", "pretraining"}
    printed = capsys.readouterr().out
    assert "| classifier forward |" in printed and "Pretraining:" in printed


def test_profile_pretraining_reads_every_window_of_an_epoch(sample_dir, h):
    result = profile_pretraining(sample_dir / "train", h.tiny_config(), epochs=2, batch_size=2)
    assert result["windows per epoch"] == 6 and result["epochs"] == 2 and result["epoch_s"] > 0


def test_time_to_model_puts_every_method_and_budget_on_one_time_axis(sample_dir, h, tmp_path, capsys):
    cfg = h.tiny_config()
    backbone = save_diffusion(build_unet(cfg.backbone), build_scheduler(cfg.backbone), tmp_path / "bb")
    settings = TimeToModelSettings(labels=3, seeds=(0,), head_steps=(1, 2), unet_steps=(1,),
                                   pretrained={0.5: str(backbone)})
    result = run_time_to_model(sample_dir, str(backbone), tmp_path / "out", settings, cfg)
    budgets = {(row["method"], row["budget"]) for row in result["rows"]}
    assert budgets == {("TextDiff head", "1 steps"), ("TextDiff head", "2 steps"),
                       ("TextDiff, pretraining + head", "0.5 min"), ("MONAI UNet", "1 steps"),
                       ("MONAI UNet, flips", "1 steps")}
    assert all(0 <= row["dice"] <= 1 and row["minutes"] > 0 for row in result["rows"])
    pretrained = next(row for row in result["rows"] if row["budget"] == "0.5 min")
    assert pretrained["minutes"] > 0.5 and pretrained["steps"] == cfg.train.steps  # the head at its default budget
    assert "cores" in result["hardware"] and (tmp_path / "out" / "dice_vs_minutes.png").is_file()
    assert "| TextDiff head | 2 steps |" in capsys.readouterr().out
