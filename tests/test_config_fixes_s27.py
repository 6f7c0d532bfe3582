"""Config files and command-line options as a user pass met them: other tools' option names,
YAML 1.1's booleans and duplicate keys, model_args in its written form, sections, a folder for
--config, and durations that start with '-'. No training: each test runs in well under a second."""

from __future__ import annotations

import pytest

from imgclf.cli import main
from imgclf.config import load_yaml, make_config, parse_seconds
from imgclf.errors import UserError


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[0]


def _user_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err.strip()


def _yaml(tmp_path, text: str, name: str = "run.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return f


# 1. other tools' names: the option that does that job here, not the nearest spelling

def test_an_output_folder_option_points_to_project_and_name(capsys):
    for flag in ("--out", "--save-dir", "--output-dir"):  # were: --cutout, --cache-dir
        err = _usage_error(["train", "--data", "x", flag, "runs/a"], capsys)
        assert f"unknown option {flag}; did you mean --project/--name? a run's folder is PROJECT/NAME" in err


def test_split_options_of_other_tools(capsys):
    err = _usage_error(["train", "--data", "x", "--val-ratio", "0.2"], capsys)  # was: --val-data
    assert "unknown option --val-ratio; did you mean --val-split?" in err
    err = _usage_error(["train", "--data", "x", "--test-split", "0.2"], capsys)  # was: --val-split
    assert "unknown option --test-split; the test split is not cut from the training data" in err
    assert "a test/ folder in the data, or --test-data" in err and "--val-split" not in err


def test_yaml_keys_of_other_tools_are_named_as_keys(tmp_path):
    for key, hint in (("out", "did you mean 'project'/'name'?"), ("save_dir", "did you mean 'project'/'name'?"),
                      ("val_ratio", "did you mean 'val_split'?"), ("test_split", "or 'test_data'")):
        f = _yaml(tmp_path, f"data: cifar10\n{key}: 0.2\n")
        with pytest.raises(UserError, match=f"unknown option '{key}'; .*{hint}"):
            make_config(f)


# 2. YAML 1.1: yes/no/on/off are booleans; a key given twice lets the last win

def test_class_names_yaml_reads_as_booleans_are_refused(tmp_path):
    f = _yaml(tmp_path, "data: cifar10\nclasses: [yes, no]\n")  # was: '--classes: True, False not in ...'
    with pytest.raises(UserError) as e:
        load_yaml(f)
    assert str(e.value) == (f"{f} line 2: classes: YAML reads yes, no as true, false, not as class names; "
                            "quote them: 'yes', 'no'")
    f = _yaml(tmp_path, "data: cifar10\nclass_weights: {On: 2, cat: 1}\n")
    with pytest.raises(UserError, match=r"line 2: class_weights: YAML reads On as true, not as a class name; "
                                        r"quote it: 'On'"):
        load_yaml(f)
    f = _yaml(tmp_path, "data: cifar10\nclasses: ['yes', 'no']\nclass_weights: {'yes': 2}\n")
    assert make_config(f).classes == "yes,no"  # quoted: names
    f = _yaml(tmp_path, "data: cifar10\nclasses: [cat, ~]\n")
    with pytest.raises(UserError, match=r"classes: YAML reads ~ as null, not as a class name; quote it: '~'"):
        load_yaml(f)
    assert make_config(_yaml(tmp_path, "data: cifar10\nclasses: null\n")).classes is None  # the default: all


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    f = _yaml(tmp_path, "data: cifar10\nlr: 0.1\nepochs: 3\nlr: 0.01\n")
    with pytest.raises(UserError) as e:
        load_yaml(f)
    assert str(e.value) == f"{f}: 'lr' is given twice (lines 2 and 4); keep one"
    f = _yaml(tmp_path, "data: cifar10\nbatch-size: 8\nbatch_size: 16\n")  # one option, as load_yaml reads it
    with pytest.raises(UserError, match=r"'batch-size' \(line 2\) and 'batch_size' \(line 3\) are the same option"):
        load_yaml(f)
    f = _yaml(tmp_path, "data: cifar10\nmodel_args: {width: 1, width: 2}\n")
    with pytest.raises(UserError, match=r"'width' is given twice \(line 2\)"):
        load_yaml(f)
    # a merge key's values are there to be overridden: not a duplicate
    f = _yaml(tmp_path, "base: &b {lr: 0.1, epochs: 2}\n<<: *b\nlr: 0.01\n")
    assert load_yaml(f)["lr"] == 0.01


def test_a_control_character_is_one_line(tmp_path):
    f = _yaml(tmp_path, "data: x\nlr: 0.1\x07\n")
    with pytest.raises(UserError) as e:
        load_yaml(f)
    assert "\n" not in str(e.value) and "is not valid YAML" in str(e.value)


# 3. model_args as --model-args writes it

def test_model_args_take_the_command_line_form_in_a_yaml_file(tmp_path):
    f = _yaml(tmp_path, "data: cifar10\nmodel_args: dropout=0.3,dense=[64]\n")  # was: 'a valid dictionary'
    assert make_config(f).model_args == {"dropout": 0.3, "dense": [64]}
    assert make_config(data="cifar10", model_args="width=1.5").model_args == {"width": 1.5}
    f = _yaml(tmp_path, "data: cifar10\nmodel_args: dropout\n")
    with pytest.raises(UserError, match="model_args': expected key=value, got 'dropout'"):
        make_config(f)


def test_a_model_args_value_that_is_not_yaml_is_one_line(capsys):
    err = _usage_error(["train", "--data", "x", "--model-args", "dense=[64"], capsys)  # was: a traceback
    assert "argument --model-args: 'dense=[64' is not key=value pairs" in err


# 4. durations

def test_a_duration_starting_with_a_dash_gets_the_options_own_error(tmp_path, capsys):
    # was: argparse's 'expected one argument' (it takes -5m for an option)
    err = _user_error(["cache", "--cache-dir", str(tmp_path), "--older-than", "-5m"], capsys)
    assert err == "imgclf: error: --older-than -5m: must be a positive finite duration: seconds, or a number " \
                  "ending in s, m, h or d (10m)"


def test_upper_case_m_and_zero_are_refused_with_what_to_write(tmp_path, capsys):
    err = _user_error(["cache", "--cache-dir", str(tmp_path), "--older-than", "5M"], capsys)  # was: 5 minutes
    assert "--older-than 5M: M is ambiguous (minutes or months?): write m for minutes (5m)" in err
    err = _user_error(["cache", "--cache-dir", str(tmp_path), "--older-than", "0"], capsys)
    assert err == ("imgclf: error: --older-than 0: must be more than 0; 'imgclf cache --clear' without "
                   "--older-than removes every entry")
    with pytest.raises(ValueError, match="not 0: for no limit, leave the option out"):  # --time-limit 0
        parse_seconds("0")
    assert parse_seconds("5m") == 300 and parse_seconds("2H") == 7200


# 5. sections

def test_a_section_says_options_are_flat(tmp_path):
    f = _yaml(tmp_path, "data: cifar10\ntrain:\n  epochs: 3\n  lr: 0.1\n  bogus: 1\n")  # was: 'did you mean pretrained?'
    with pytest.raises(UserError) as e:
        make_config(f)
    assert str(e.value) == (f"{f}: unknown option 'train' (a section): options are flat, top-level keys; "
                            "move epochs, lr to the top level")


# 6. --config given a folder

def test_config_given_a_folder(tmp_path, capsys):
    err = _user_error(["train", "--config", str(tmp_path)], capsys)  # was: imgclf.train(data=...) advice
    assert err == f"imgclf: error: --config {tmp_path} is a folder: give a YAML file"
    with pytest.raises(UserError, match="is a folder: give a YAML file"):
        load_yaml(tmp_path)


# notebook spellings (the API pass)

def test_keras_and_notebook_spellings_of_values_are_read():
    # image_size=(224, 224) as Keras' target_size, optimizer="Adam": refused before; epochs=True
    # trained one epoch
    from imgclf.config import make_config

    cfg = make_config(None, data="x", image_size=(48, 48), optimizer="Adam", schedule="Cosine", resize="Crop")
    assert (cfg.image_size, cfg.optimizer, cfg.schedule, cfg.resize) == (48, "adam", "cosine", "crop")
    with pytest.raises(UserError, match=r"\(48, 64\): images are resized to one square size; give one number"):
        make_config(None, data="x", image_size=(48, 64))
    with pytest.raises(UserError, match="option 'epochs': True is a yes/no, not a number"):
        make_config(None, data="x", epochs=True)
    with pytest.raises(UserError, match="Input should be 'auto', 'sgd'"):
        make_config(None, data="x", optimizer="adamx")


def test_none_on_the_command_line_takes_back_what_a_config_file_set(tmp_path):
    # a time-limited run's config.yaml could not be repeated without its limit: --time-limit none
    # was 'must be a positive finite duration', --batch-size none 'invalid int value'
    from imgclf import cli
    from imgclf.config import make_config

    path = tmp_path / "run.yaml"
    path.write_text(f"data: {tmp_path}\ntime_limit: 30\nbatch_size: 64\nhead: [64]\nlr: 0.1\nepochs: 1.6\n"
                    "derived: {epochs: null}\n")
    args = cli.build_parser().parse_args(["train", "--config", str(path), "--time-limit", "none", "--batch-size",
                                          "None", "--head", "none", "--lr", "auto"])
    cfg = make_config(path, **cli._train_options(args))
    assert (cfg.time_limit, cfg.batch_size, cfg.head, cfg.lr) == (None, None, None, "auto")
    assert cfg.epochs is None  # the planned 1.6 was the time limit's choice: chosen again
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--batch-size", "nothing"])
    import pickle

    from imgclf.config import UNSET

    assert pickle.loads(pickle.dumps(UNSET)) is UNSET  # --devices N hands the options to spawned processes
