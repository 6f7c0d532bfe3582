"""A Keras user's options: ones that were accepted and silently ignored, other tools' names that got
the wrong 'did you mean', Keras-style [low, high] ranges, a cutout as large as the image, and float
noise in config.yaml. No training: each test reads options only."""

from __future__ import annotations

import pytest
import yaml

from imgclf import log
from imgclf.cli import main
from imgclf.config import TrainConfig, dump_yaml, make_config
from imgclf.errors import UserError


@pytest.fixture(autouse=True)
def _fresh_warnings():
    log.reset()  # each warning is said once per process: every test hears its own


def _usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[0]


def _yaml(tmp_path, text: str):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    return f


# 1. options that the chosen model or schedule does not use

def test_head_dropout_without_a_new_timm_head_is_refused(tmp_path):
    # was: accepted, and fastnet/plaincnn (which have their own classifier) trained without it
    for model, arch in (("plaincnn", "plaincnn"), ("fastnet", "fastnet"), ("auto", "fastnet")):
        with pytest.raises(UserError, match=f"--head-dropout 0.3 is the dropout of a new head on a timm model; "
                                            f"{arch} has its own classifier"):
            make_config(None, data="d", model=model, head_dropout=0.3)
    with pytest.raises(UserError, match="dense_dropout"):  # plaincnn's own dropout is named
        make_config(_yaml(tmp_path, "data: cifar10\nmodel: plaincnn\nhead_dropout: 0.3\n"))
    # a timm model without --head, --pretrained or --weights keeps timm's own classifier
    with pytest.raises(UserError, match="needs a new head on the timm backbone: add --head, --pretrained"):
        make_config(None, data="d", model="timm:resnet18", head_dropout=0.3)
    for extra in ({"head": "64"}, {"pretrained": True}, {"weights": "w.safetensors"}):
        assert make_config(None, data="d", model="timm:resnet18", head_dropout=0.3, **extra).head_dropout == 0.3
    assert make_config(None, data="d", model="plaincnn").head_dropout == 0.2  # the default is no choice
    # a run's own config.yaml (read by --resume, evaluate, report) is not judged again
    cfg = TrainConfig(data="cifar10", model="plaincnn", head_dropout=0.3)
    cfg._derived = {"epochs": None}
    dump_yaml(cfg, tmp_path / "config.yaml")
    assert make_config(tmp_path / "config.yaml").head_dropout == 0.3


def test_schedule_options_without_their_schedule_warn(tmp_path, capsys):
    # was: --plateau-patience/--plateau-factor and --step-epochs/--gamma ignored without a word
    make_config(None, data="d", schedule="cosine", plateau_patience=5, plateau_factor=0.5)
    err = capsys.readouterr().err
    assert "warning: --plateau-patience, --plateau-factor: not used by --schedule cosine (only by --schedule " \
           "plateau)" in err
    make_config(_yaml(tmp_path, "data: cifar10\nschedule: onecycle\nstep_epochs: 5\ngamma: 0.5\n"))
    assert "--step-epochs, --gamma: not used by --schedule onecycle (only by --schedule step)" in \
        capsys.readouterr().err
    # the schedule that uses them, 'auto' (the recipe resolves it), or defaults: nothing said
    make_config(None, data="d", schedule="plateau", plateau_patience=5)
    make_config(None, data="d", schedule="step", step_epochs=5, gamma=0.5)
    make_config(None, data="d", plateau_patience=5, gamma=0.5)
    make_config(None, data="d", schedule="cosine", plateau_patience=2, gamma=0.1)
    assert "warning" not in capsys.readouterr().err


# 2. Keras' names for options: ours, or what to do instead, on the command line and in YAML

KERAS_FLAGS = {
    "--epsilon": "did you mean --eps?",
    "--factor": "did you mean --plateau-factor?",
    "--reduce-lr-factor": "did you mean --plateau-factor?",
    "--height-shift": "did you mean --shift?",
    "--width-shift": "did you mean --shift?",
    "--width-shift-range": "did you mean --shift?",
    "--height-shift-range": "did you mean --shift?",
    "--horizontal-flip": "did you mean --flip?",
    "--zoom-range": "did you mean --zoom?",
    "--rotation-range": "did you mean --rotate?",
    "--kernel-regularizer": "did you mean --l2?",
    "--shear": "no such augmentation here; the augmentations are --flip (horizontal), --translate",
    "--channel-shift": "no such augmentation here",
    "--crop": "the random crop is --translate N",
    "--random-crop": "the random crop is --translate N",
    "--decay": "Keras' decay lowers the learning rate, it is not weight decay: the lr follows --schedule",
}


def test_keras_option_names_point_to_ours(capsys):
    # were: --min-lr -> --muon-lr, --restore-best-weights -> --class-weights, --epsilon -> --precision,
    # --factor -> --lr-end-factor, --shear -> --head, --height-shift -> --weights, --decay -> --weight-decay
    for flag, hint in KERAS_FLAGS.items():
        err = _usage_error(["train", "--data", "x", flag, "0.1"], capsys)
        assert f"unknown option {flag}; {hint}" in err, err
    err = _usage_error(["train", "--data", "x", "--restore-best-weights"], capsys)
    if "keep" in TrainConfig.model_fields:
        assert "a run ends on its best epoch's weights (by --monitor) unless --keep last says otherwise" in err
    else:
        assert "nothing to set: imgclf always keeps the best epoch's weights" in err
    err = _usage_error(["train", "--data", "x", "--min-lr", "1e-5"], capsys)
    if "plateau_min_lr" in TrainConfig.model_fields:
        assert "unknown option --min-lr; did you mean --plateau-min-lr?" in err
    else:
        assert "--schedule plateau stops lowering the lr at 1e-4 x the peak --lr" in err and "muon" not in err


def test_keras_yaml_keys_are_named_as_keys(tmp_path):
    for key, hint in (("epsilon", "did you mean 'eps'?"), ("width_shift_range", "did you mean 'shift'?"),
                      ("zoom_range", "did you mean 'zoom'?"), ("restore_best_weights", "best epoch's weights \\(by 'monitor'\\)"),
                      ("decay", "not weight decay: the lr follows 'schedule'"), ("shear_range", "'flip'"),
                      ("random_crop", "the random crop is 'translate' N")):
        with pytest.raises(UserError, match=f"unknown option '{key}'; .*{hint}"):
            make_config(_yaml(tmp_path, f"data: cifar10\n{key}: 0.1\n"))


# 3. Keras' [low, high] ranges

def test_a_symmetric_range_is_read_as_one_number_and_an_asymmetric_one_refused(tmp_path, capsys):
    # was: "Input should be a valid number"
    cfg = make_config(_yaml(tmp_path, "data: cifar10\nzoom: [0.8, 1.2]\nshift: [-0.1, 0.1]\nrotate: [-15, 15]\n"))
    assert (cfg.zoom, cfg.shift, cfg.rotate) == (0.2, 0.1, 15.0)
    err = capsys.readouterr().err
    assert "zoom [0.8, 1.2] is read as zoom 0.2 (0.8x-1.2x)" in err
    assert "rotate [-15, 15] is read as rotate 15 (-15 to 15 degrees)" in err
    for text, says in (("zoom: [0.8, 1.5]", "takes one number z, a random scale between 1-z and 1+z (0.2: 0.8x-1.2x)"),
                       ("shift: [0.1, 0.2]", "takes one number f, a random shift of up to f of the size"),
                       ("rotate: [0, 15]", "takes one number d, a random rotation between -d and +d degrees")):
        with pytest.raises(UserError) as e:
            make_config(_yaml(tmp_path, f"data: cifar10\n{text}\n"))
        assert says in str(e.value) and "valid number" not in str(e.value) and "\n" not in str(e.value)


# 4. a cutout as large as the image

def test_a_cutout_not_smaller_than_the_image_is_refused(tmp_path, capsys):
    # was: accepted, and every training image erased (while --translate 40 at 16 px is refused)
    for size in (16, 100):
        with pytest.raises(UserError, match=f"--cutout 100 must be smaller than the image size \\({size} px\\)"):
            make_config(None, data="d", image_size=size, cutout=100)
    assert make_config(None, data="d", image_size=16, cutout=8).cutout == 8
    assert "must be smaller" in _usage_error_of_train(["--data", "d", "--image-size", "16", "--cutout", "100"], capsys)


def _usage_error_of_train(args, capsys) -> str:
    assert main(["train", *args]) == 2
    return capsys.readouterr().err.strip()


# 5. float noise in config.yaml

def test_config_yaml_holds_floats_as_written_not_as_arithmetic_left_them(tmp_path):
    cfg = TrainConfig(data="d", warmup_epochs=10 * 0.23, epochs=0.1 + 0.2, lr=0.001 * 0.5 ** 0.5)
    cfg._derived = {"warmup_epochs": 0.1 + 0.2}
    dump_yaml(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "0000000" not in text  # was: warmup_epochs: 2.3000000000000003
    saved = yaml.safe_load(text)
    assert (saved["warmup_epochs"], saved["epochs"], saved["derived"]["warmup_epochs"]) == (2.3, 0.3, 0.3)
    assert saved["lr"] == 0.001 * 0.5 ** 0.5  # every digit of a value that is no noise: a resume trains with it
