"""Linear probe, then fine-tune (models/probe.py): a pretrained backbone's new head is fitted on
its frozen features before the first step."""

from __future__ import annotations

import pytest
import torch

import imgclf
from imgclf.config import make_config
from imgclf.engine import recipe
from imgclf.engine.callbacks import Callback
from imgclf.models import pretrained
from imgclf.models.pretrained import load_into, map_lite_keys, read_state_dict


class AtStart(Callback):
    """The model as the first step finds it: its weights and its val accuracy."""

    def on_train_start(self, t):
        self.backbone = {k: v.detach().clone() for k, v in t.model.backbone.state_dict().items()}
        self.head = {k: v.detach().clone() for k, v in t.model.head.state_dict().items()}
        self.val_acc = t.validate()["val_acc"]
        t.model.train()


def _train(data, tmp_path, name, **kw):
    at = AtStart()
    res = imgclf.train(data=str(data), model="efficientnet_lite0", pretrained=True, image_size=64, epochs=0.1,
                       val_split=0.25, project=str(tmp_path), name=name, progress=False, tensorboard=False,
                       tta=False, callbacks=[at], **kw)
    return res, at


def test_the_probe_fits_the_head_before_any_step_and_leaves_the_backbone_as_loaded(small_sample, tmp_path, capsys):
    res, at = _train(small_sample, tmp_path, "probe", probe=True)
    err = capsys.readouterr().err
    # 300 of the 400 images train (val_split 0.25), each read once, with its flip
    assert "probe: head fitted on the frozen backbone's features of 300 training images and their flips" in err
    assert res.config.probe is True and res.config.freeze_epochs == 0  # no head-only phase after it
    # the backbone is bit for bit the published Lite0, BatchNorm statistics included
    import timm

    ref = timm.create_model("efficientnet_lite0", num_classes=0, **pretrained.LITE_ARCH_ARGS)
    load_into(ref, map_lite_keys(read_state_dict(pretrained.lite_package_file("efficientnet_lite0")), ref),
              "lite0", drop=("classifier.",))
    want = ref.state_dict()
    assert set(at.backbone) == set(want)
    assert all(torch.equal(at.backbone[k], want[k]) for k in want)
    # the head already classifies: 10 classes, chance 0.1 (measured 0.5-0.6 at 64 px)
    assert at.val_acc >= 0.35, at.val_acc

    plain_res, plain = _train(small_sample, tmp_path, "plain")  # the default: a head-only phase instead
    assert plain_res.config.probe is False and plain.val_acc <= 0.25, plain.val_acc  # a random head: near chance
    assert not torch.equal(plain.head["1.weight"], at.head["1.weight"])


def test_a_head_kept_from_an_earlier_run_is_not_refitted(small_sample, tmp_path, capsys):
    first, _ = _train(small_sample, tmp_path, "first", probe=True)
    capsys.readouterr()
    from safetensors.torch import load_file

    saved = load_file(str(first.run_dir / "model.safetensors"))
    _, at = _train(small_sample, tmp_path, "second", weights=str(first.run_dir / "model.safetensors"), probe=True)
    err = capsys.readouterr().err
    assert "the head of the run in --weights is kept, not refitted" in err and "probe: head fitted" not in err
    assert all(torch.equal(at.head[k], saved[f"head.{k}"]) for k in at.head)

    # a class the earlier run never saw has a fresh row: the probe fits the head, from what it kept
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(small_sample, renamed)
    for split in ("train", "test"):
        (renamed / split / "truck").rename(renamed / split / "lorry")
    _train(renamed, tmp_path, "third", weights=str(first.run_dir / "model.safetensors"), probe=True)
    err = capsys.readouterr().err
    assert "probe: head fitted" in err and "is kept, not refitted" not in err


def test_the_probe_is_asked_for_and_then_replaces_the_head_only_phase():
    from imgclf.errors import UserError

    def resolved(arch, **kw):
        cfg = make_config(None, data="d", model=arch, **kw)
        return recipe.resolve(cfg, n_train=2000, image_size=128, arch=arch)

    off = resolved("timm:efficientnet_lite0", pretrained=True)  # the default: fastai's head-only epoch
    assert off.probe is False and off.freeze_epochs == 1
    on = resolved("timm:efficientnet_lite0", pretrained=True, probe=True)
    assert on.probe is True and on.freeze_epochs == 0
    # the user's head-only epochs stand beside the probe
    assert resolved("timm:efficientnet_lite0", pretrained=True, probe=True, freeze_epochs=2).freeze_epochs == 2
    with pytest.raises(UserError, match="--probe fits a new head on pretrained features: .* not random weights"):
        resolved("timm:resnet18", head=[256], probe=True)
    with pytest.raises(UserError, match="--probe .* not fastnet"):
        resolved("fastnet", probe=True)


@pytest.mark.parametrize("bad", ["maybe", "2"])
def test_probe_takes_a_yes_or_no(bad):
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="probe"):
        make_config(None, data="d", probe=bad)
