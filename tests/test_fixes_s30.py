"""Review 30's fixes, each with the behaviour it restores: --weights RUN records the run's head
dropout in config.yaml; schedule options under --schedule auto are warned; the sweep report counts
interrupted trials apart and draws every trial in its parallel coordinates."""

from __future__ import annotations

import json
from pathlib import Path

from test_transfer_fixes_s29 import FAST, _fake_run

import imgclf
from imgclf.config import make_config


def test_a_runs_head_dropout_is_recorded_so_a_repeat_builds_the_same_head(small_sample, tmp_path):
    # was: the model used the run's 0.35, config.yaml recorded the default 0.2, and a repeat from
    # that config.yaml (a named head_dropout now) built its head with 0.2
    w = _fake_run(tmp_path / "prev", "timm:test_resnet", 10, 32, {"head": [16], "head_dropout": 0.35,
                                                                   "small_stem": False})
    res = imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(w.parent), image_size=32,
                       epochs=1, val_split=0.0, batch_size=100, project=str(tmp_path), name="ft", **FAST)
    assert json.loads((res.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.35
    assert make_config(res.run_dir / "config.yaml").head_dropout == 0.35
    again = imgclf.train(config=str(res.run_dir / "config.yaml"), name="again", **FAST)
    assert json.loads((again.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.35
    # the user's own --head-dropout still wins, and is what config.yaml says
    own = imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(w.parent), image_size=32,
                       epochs=1, val_split=0.0, batch_size=100, project=str(tmp_path), name="own",
                       head_dropout=0.1, **FAST)
    assert json.loads((own.run_dir / "model.json").read_text())["arch_args"]["head_dropout"] == 0.1
    assert make_config(own.run_dir / "config.yaml").head_dropout == 0.1


def test_schedule_options_under_auto_warn_once_the_recipe_picks_another(capsys):
    # was: --schedule auto (the default) resolved to onecycle or cosine, and --plateau-patience or
    # --gamma were dropped without a word (a named schedule already warned, in make_config)
    from imgclf.engine import recipe

    def resolved(arch="fastnet", **options):
        cfg = make_config(None, data="d", model=arch, **options)
        return recipe.resolve(cfg, n_train=5000, image_size=32, arch=arch, multilabel=False).schedule

    assert resolved(plateau_patience=4, gamma=0.5) == "onecycle"
    err = capsys.readouterr().err
    assert ("--plateau-patience: not used by --schedule auto, which is onecycle for this run (set --schedule "
            "plateau to use it)") in err
    assert "--gamma: not used by --schedule auto, which is onecycle for this run (set --schedule step" in err
    assert resolved("timm:resnet18", plateau_patience=4, plateau_factor=0.3) == "cosine"
    assert "--plateau-patience, --plateau-factor: not used by --schedule auto, which is cosine" in capsys.readouterr().err
    resolved(schedule="plateau", plateau_patience=4)  # the schedule that uses them, or defaults: nothing said
    resolved(plateau_patience=2, gamma=0.1)
    assert "not used" not in capsys.readouterr().err

