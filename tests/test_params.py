"""What a person types is read by one parser, and only bad input is the person's fault: a DataError is a 4xx (or a
one-line CLI error), any other exception is a bug that keeps its traceback (a 500)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi import HTTPException

from textdiff.errors import DataError

sys.path.insert(0, str(Path(__file__).parents[1] / "apps" / "textdiff"))
from lib.configs.params import parse_value  # noqa: E402
from lib.configs.settings import AppSettings  # noqa: E402
from lib.errors import client_errors  # noqa: E402
from lib.trainers.base import StatsTrainTask  # noqa: E402


def test_one_parser_reads_flags_numbers_and_text_as_their_defaults_types():
    assert [parse_value(v, False, "x") for v in ("true", "YES", 1, True, "0", "no", False)] == [True] * 4 + [False] * 3
    assert parse_value("12", 0, "x") == 12 and parse_value(3, 0.5, "x") == 3.0
    assert parse_value("a", "", "x", choices=("a", "b")) == "a"
    for value, default, bounds, choices, message in (("maybe", False, None, None, "x must be true or false"),
                                                     ("1.5", 0, None, None, "x must be a whole number"),
                                                     ("nan", 0.0, (0, 1), None, "x must be between"),
                                                     (7, 0, (0, 5), None, "x must be between 0 and 5"),
                                                     ("c", "", None, ("a", "b"), "x must be one of ['a', 'b']"),
                                                     (3, "", None, None, "x must be text")):
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_value(value, default, "x", bounds, choices)


def test_conf_values_go_through_the_same_parser(tmp_path):
    settings = AppSettings.from_conf({"fast_infer": "no", "steps": "50", "pretrain_minutes": "2.5"}, str(tmp_path))
    assert (settings.fast_infer, settings.steps, settings.pretrain_minutes) == (False, 50, 2.5)
    with pytest.raises(DataError, match="--conf fast_infer must be true or false, got 'maybe'"):
        AppSettings.from_conf({"fast_infer": "maybe"}, str(tmp_path))  # was read as false without a word
    with pytest.raises(DataError, match="--conf steps must be a whole number"):
        AppSettings.from_conf({"steps": "many"}, str(tmp_path))
    assert AppSettings.from_conf({"checkpoint": "best"}, str(tmp_path)).checkpoint == "best"
    with pytest.raises(DataError, match="--conf checkpoint must be one of"):
        AppSettings.from_conf({"checkpoint": "first"}, str(tmp_path))


def test_the_head_entry_conf_reaches_the_library_config(tmp_path):
    from lib.configs.textdiff import TextDiffTaskConfig

    app_dir = Path(__file__).parents[1] / "apps" / "textdiff"
    for value, expected in (("false", False), ("true", True)):
        config = TextDiffTaskConfig()
        config.init("textdiff", str(tmp_path / value), {"model_dir": str(tmp_path / value), "demo_weights": "false",
                                                        "per_scale_entry": value}, None, app_dir=str(app_dir))
        assert config.cfg.head.per_scale_entry is expected


def test_the_small_structures_conf_gives_a_new_model_the_measured_head_recipe(tmp_path):
    """`--conf small_structures true`: the per-pixel MLP head on cross-entropy alone, and the run's defaults
    (300 steps at 3e-3) unless the conf gives its own steps."""
    from lib.configs.textdiff import TextDiffTaskConfig

    app_dir = Path(__file__).parents[1] / "apps" / "textdiff"
    for conf, steps in (({}, 300), ({"steps": "120"}, 120)):
        config = TextDiffTaskConfig()
        config.init("textdiff", str(tmp_path), {"model_dir": str(tmp_path / str(steps)), "demo_weights": "false",
                                                "small_structures": "true", **conf}, None, app_dir=str(app_dir))
        head, train = config.cfg.head, config.cfg.train
        assert (head.classifier, head.head_channels, train.dice_weight) == ("pixel_mlp", (128, 128), 0.0)
        assert (config.trainer().config()["max_steps"], config.trainer().config()["learning_rate"]) == (steps, 0.003)
    plain = TextDiffTaskConfig()
    plain.init("textdiff", str(tmp_path), {"model_dir": str(tmp_path / "plain"), "demo_weights": "false"}, None,
               app_dir=str(app_dir))
    assert (plain.cfg.head.classifier, plain.trainer().config()["max_steps"]) == ("conv", 150)


def test_only_bad_input_becomes_a_client_error():
    with pytest.raises(HTTPException) as answer, client_errors():
        raise DataError("mask 'a.png' is 3x3 but its image is 4x4")
    assert answer.value.status_code == 422 and "a.png" in answer.value.detail
    for bug in (ValueError("operands could not be broadcast"), TypeError("'NoneType' is not subscriptable")):
        with pytest.raises(type(bug)), client_errors():  # MONAI Label answers 500 and logs the traceback
            raise bug


def test_the_cli_prints_bad_input_in_a_line_and_lets_a_bug_show_its_traceback(monkeypatch, capsys):
    from textdiff import cli

    def command_raising(error):
        monkeypatch.setattr(cli, "cmd_evaluate", lambda args: (_ for _ in ()).throw(error))
        return cli.main(["evaluate", "--model", "m.pt", "--data", "d"])

    assert command_raising(DataError("no images in 'd'")) == 2
    assert "textdiff evaluate: error: no images in 'd'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a bug"):
        command_raising(ValueError("a bug"))


def test_a_run_reads_its_params_at_their_types_even_when_a_job_passes_them_as_text(tmp_path):
    class Recorder(StatsTrainTask):
        def pre_process(self, request, datastore):
            return None

        def train(self, request, data):
            return {"seen": {k: request[k] for k in ("continue_from_current", "max_steps", "learning_rate")}}

    task = Recorder("a task", {"continue_from_current": True, "max_steps": 100, "learning_rate": 1e-3},
                    tmp_path / "stats.json")
    stats = task({"model": "x", "continue_from_current": "false", "max_steps": "20", "device": "cpu"}, None)
    assert stats["seen"] == {"continue_from_current": False, "max_steps": 20, "learning_rate": 1e-3}
    with pytest.raises(HTTPException) as answer:
        task({"continue_from_current": "perhaps"}, None)
    assert answer.value.status_code == 422 and "continue_from_current" in answer.value.detail


@pytest.mark.parametrize("value, expected", [("true", True), (None, False)])
def test_the_pretrain_bfloat16_conf_reaches_the_pretraining_run(tmp_path, monkeypatch, value, expected):
    from textdiff.config import BackboneConfig
    from lib.trainers import pretrain as task

    given = []
    monkeypatch.setattr(task, "pretrain", lambda folders, out, cfg, settings, **kwargs: (
        given.append(settings), [{"epoch": 1, "loss": 0.1, "seconds": 1.0, "stopped": "epochs"}])[1])
    settings = AppSettings.from_conf({} if value is None else {"pretrain_bfloat16": value}, str(tmp_path))
    trainer = task.DiffusionPretrain(settings, BackboneConfig(), head_trainer=None, description="pretrain")
    request = {**trainer.config(), "run_id": "run", "continue_from_current": False, "device": "cpu"}
    trainer.train(request, {"studies": str(tmp_path), "labeled": []})
    assert [s.bfloat16 for s in given] == [expected]
