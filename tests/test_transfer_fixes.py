"""Transfer learning fixes: a run's own weights rebuild its network, own nets fine-tune on new
classes, offline hub weights fail fast and quietly, head sizes and freezing options are checked."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from imgclf import log
from imgclf.config import make_config
from imgclf.errors import UserError
from imgclf.models import head as transfer
from imgclf.models import pretrained
from imgclf.models.registry import arch_args_for_record, build_model


def _fake_run(folder: Path, arch: str, classes: int, size: int, args: dict | None = None) -> Path:
    """An imgclf run folder as train leaves it (model.safetensors + model.json), without training."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    arch_args = arch_args_for_record(arch, size, dict(args or {}))
    torch.manual_seed(0)
    model = build_model(arch, classes, size, arch_args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "format": "imgclf.model/1", "architecture": arch, "arch_args": arch_args, "classes": [str(i) for i in range(classes)],
        "task": "single", "image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "weights": "model.safetensors"}))
    return folder / "model.safetensors"


def _transfer_model(arch: str, weights: str, size: int, classes: int = 10, **options):
    """What api.train builds from --weights: plan, arch args (the user's --model-args laid over),
    the model, and the weights loaded into it."""
    cfg = make_config(None, data="d", model=arch, weights=weights, **options)
    source = pretrained.plan(arch, weights, False)
    args = arch_args_for_record(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    model = build_model(arch, classes, size, args)
    transfer.setup_transfer(model, arch, cfg, source)
    return model, args


# -- 1. a run's own timm weights rebuild the network that was trained --------------------------


def test_a_small_input_runs_weights_keep_its_stem_for_resnet_and_efficientnet(tmp_path):
    # a 32-px run records small_stem=True; reusing its weights built a stride-2 stem instead
    # (efficientnet: silently another net) or a 7x7 conv1 its 3x3 one cannot load (resnet)
    w = _fake_run(tmp_path / "ela", "timm:efficientnet_lite0", 5, 32)
    model, args = _transfer_model("timm:efficientnet_lite0", str(w), 32)
    assert args["small_stem"] is True and model.backbone.conv_stem.stride == (1, 1)
    from safetensors.torch import load_file

    saved = load_file(str(w))
    assert torch.equal(model.backbone.conv_stem.weight, saved["conv_stem.weight"])

    w = _fake_run(tmp_path / "r18", "timm:resnet18", 3, 32)
    model, args = _transfer_model("timm:resnet18", str(w), 32)
    assert args["small_stem"] is True and model.backbone.conv1.weight.shape[-1] == 3
    assert torch.equal(model.backbone.conv1.weight, load_file(str(w))["conv1.weight"])

    # reused at a larger size: still the trained stem (True alone means "at <= 64 px")
    model, args = _transfer_model("timm:resnet18", str(w), 96)
    assert args["small_stem"] == "always" and model.backbone.conv1.weight.shape[-1] == 3
    rebuilt = build_model("timm:resnet18", 10, 96, args)  # what loading the new run does with its model.json
    assert rebuilt.backbone.conv1.weight.shape[-1] == 3 and isinstance(rebuilt.backbone.maxpool, torch.nn.Identity)

    # the user's --model-args win over the run's record
    model, args = _transfer_model("timm:efficientnet_lite0", str(tmp_path / "ela" / "model.safetensors"), 32,
                                  model_args={"small_stem": False})
    assert args["small_stem"] is False and model.backbone.conv_stem.stride == (2, 2)


def test_a_stem_mismatch_names_the_model_argument_that_fits(tmp_path):
    w = _fake_run(tmp_path / "r18", "timm:resnet18", 3, 32)
    loose = tmp_path / "copied.safetensors"  # the weights file without its model.json
    loose.write_bytes(w.read_bytes())
    with pytest.raises(UserError, match=r"conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\).*"
                                        r"fit small_stem=true: add --model-args small_stem=true") as e:
        _transfer_model("timm:resnet18", str(loose), 32)
    assert "\n" not in str(e.value)
    model, _ = _transfer_model("timm:resnet18", str(loose), 32, model_args={"small_stem": True})  # the advice works
    assert model.backbone.conv1.weight.shape[-1] == 3


# -- 2. own nets fine-tuned on another class set -------------------------------------------------


@pytest.mark.parametrize("arch,args", [("fastnet", {"width": 0.5}), ("plaincnn", {"dropout": 0.0, "dense": [64]})])
def test_an_own_nets_weights_load_onto_another_class_count(tmp_path, arch, args, capsys):
    from safetensors.torch import load_file

    # the run's own model arguments come along: its layers are those the weights fit
    w = _fake_run(tmp_path / "three", arch, 3, 32, args)
    model, _ = _transfer_model(arch, str(w), 32, classes=5)  # was: head.weight (3, 256) vs (5, 256)
    err = capsys.readouterr().err
    assert "ignored 1 classifier tensors" in err if arch == "fastnet" else "ignored 2 classifier tensors" in err
    assert "a new head is trained" in err
    saved, now = load_file(str(w)), model.state_dict()
    out = [k for k in now if now[k].shape != saved[k].shape]
    assert out and all(now[k].shape[0] == 5 for k in out)  # only the output layer is new
    assert all(torch.equal(now[k], saved[k]) for k in now if k not in out)


def test_fastnet_fine_tunes_a_run_trained_on_other_classes(small_sample, tmp_path, capsys):
    import imgclf
    from imgclf.engine.callbacks import Callback

    w = _fake_run(tmp_path / "fn3", "fastnet", 3, 32)

    class First(Callback):
        def on_train_start(self, t):
            self.conv = t.model.layers[0].conv1.weight.detach().clone()
            self.whiten = t.model.whiten.weight.detach().clone()

    first = First()
    res = imgclf.train(data=str(small_sample), model="fastnet", weights=str(w), image_size=32, epochs=1,
                       val_split=0.0, project=str(tmp_path), name="ft", progress=False, tensorboard=False, tta=False,
                       callbacks=[first])
    from safetensors.torch import load_file

    state = load_file(str(w))
    assert torch.equal(first.conv, state["layers.0.conv1.weight"])  # the earlier run's features
    # and the whitening stem they were trained on: it was recomputed from the new data, flipping filters' signs
    assert torch.equal(first.whiten, state["whiten.weight"])
    assert "ignored 1 classifier tensors (head.weight" in capsys.readouterr().err
    assert len(json.loads((res.run_dir / "model.json").read_text())["classes"]) == 10


# -- 3. offline hub weights: fast, quiet, and checkable before the data is read ----------------


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty Hugging Face and torch hub cache, and every connection attempt recorded and refused."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def refuse(address, timeout=None, *a, **k):
        tried.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return tried


def _hub_must_not_be_asked(monkeypatch):
    import timm

    real = timm.create_model

    def create(name, pretrained=False, **kw):
        if pretrained and "file" not in (kw.get("pretrained_cfg_overlay") or {}):
            pytest.fail(f"asked the hub for {name}'s weights")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", create)


def test_offline_hub_weights_fail_in_one_line_without_trying_to_download(no_hub, monkeypatch):
    # offline, huggingface_hub retried each file 5 times (~45 s, 26 lines) before the error
    _hub_must_not_be_asked(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"could not download pretrained weights for resnet18 \(no network\? "
                                        r"huggingface\.co:443: Name or service not known\); pass --weights FILE"):
        pretrained._timm_hub_state("resnet18")
    assert time.perf_counter() - t0 < 5
    assert no_hub == [(("huggingface.co", 443), 3.0)]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: not even a connection attempt
    no_hub.clear()
    with pytest.raises(UserError, match=r"resnet18 \(HF_HUB_OFFLINE is set and they are not in the Hugging Face "
                                        r"cache\); pass --weights FILE"):
        pretrained._timm_hub_state("resnet18")
    assert no_hub == []


def test_hub_weights_in_the_cache_load_without_the_network(no_hub, tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    ref = timm.create_model("resnet18")
    snap = Path(constants.HF_HUB_CACHE) / "models--timm--resnet18.a1_in1k" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    _hub_must_not_be_asked(monkeypatch)  # timm would ask the hub first (5 retries offline)
    state = pretrained._timm_hub_state("resnet18")
    assert torch.equal(state["conv1.weight"], ref.conv1.weight) and no_hub == []
    pretrained.check_available("timm:resnet18", make_config(None, data="d", pretrained=True))  # cached: fine


def test_hub_retry_messages_are_silenced(no_hub, monkeypatch):
    import timm

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: SimpleNamespace(close=lambda: None))
    http_log = logging.getLogger("huggingface_hub.utils._http")  # where huggingface_hub logs its retries
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    http_log.addHandler(handler)

    def flaky(name, pretrained=False, **kw):  # reachable, then the download fails as it does offline
        http_log.warning("Retrying in 8s [Retry 5/5].")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(timm, "create_model", flaky)
    level = logging.getLogger("huggingface_hub").level
    try:
        with pytest.raises(UserError, match=r"could not download pretrained weights for resnet18 \(no network\?\)"):
            pretrained._timm_hub_state("resnet18")
    finally:
        http_log.removeHandler(handler)
    assert shown == []  # was: 26 lines of 'Retrying in 8s [Retry 5/5]' before the error
    assert logging.getLogger("huggingface_hub").level == level  # restored after the download


def test_check_available_fails_before_any_data_is_read(no_hub, monkeypatch, tmp_path):
    _hub_must_not_be_asked(monkeypatch)

    def cfg(**kw):
        return make_config(None, data="d", **kw)

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"could not download pretrained weights for resnet18 \(no network\?"):
        pretrained.check_available("timm:resnet18", cfg(pretrained=True))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(UserError, match="--pretrained needs a timm model"):
        pretrained.check_available("fastnet", cfg(pretrained=True))
    with pytest.raises(UserError, match="no such file"):
        pretrained.check_available("timm:resnet18", cfg(weights=str(tmp_path / "nothing.pt")))
    with pytest.raises(UserError, match=r"--weights https://example\.org/w\.pt: could not download it \(example\.org:443"):
        pretrained.check_available("timm:resnet18", cfg(weights="https://example.org/w.pt#sha256=" + "0" * 16))
    no_hub.clear()
    pretrained.check_available("timm:efficientnet_lite0", cfg(pretrained=True))  # the pip package: offline
    pretrained.check_available("fastnet", cfg())
    assert no_hub == []


def test_train_checks_the_weights_before_reading_the_data(small_sample, tmp_path, monkeypatch):
    import imgclf
    from imgclf import api

    monkeypatch.setattr(api, "load_source", lambda *a, **k: pytest.fail("data read before the weights were checked"))
    with pytest.raises(UserError, match="no such file"):
        imgclf.train(data=str(small_sample), model="timm:resnet18", weights=str(tmp_path / "nothing.pt"),
                     project=str(tmp_path), progress=False, tensorboard=False)
    with pytest.raises(UserError, match="unknown model"):
        imgclf.train(data=str(small_sample), model="resnt18x", project=str(tmp_path), progress=False,
                     tensorboard=False)


# -- 4, 5, 8. head sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["-5", "0", "512,,256", "512,", "64,abc", "1.5"])
def test_bad_head_sizes_are_one_line(spec):
    # -5 crashed in torch, 0 trained a constant prediction, '512,,256' became 512,256
    with pytest.raises(UserError, match=r"option 'head': .*head sizes must be positive integers") as e:
        make_config(None, data="d", model="timm:resnet18", head=spec)
    assert "\n" not in str(e.value)


def test_good_head_sizes_and_model_args_heads():
    for spec, want in (("512,256", [512, 256]), ("512, 256", [512, 256]), ("512 256", [512, 256]), ("", []),
                       ("linear", []), ([64], [64]), ("64", [64])):
        assert make_config(None, data="d", head=spec).head == want, spec
    with pytest.raises(UserError, match="head sizes must be positive integers"):
        build_model("timm:resnet18", 10, 32, {"head": [0]})  # --model-args head=[0] skips the config's check


# -- 6, 7. freezing ----------------------------------------------------------------------------


def _trainer(total_steps, frozen_epochs, callbacks=()):
    model = SimpleNamespace(backbone_frozen=False, freeze_backbone=lambda f: setattr(model, "backbone_frozen", f))
    return SimpleNamespace(step=0, steps_per_epoch=10, total_steps=total_steps, model=model, callbacks=list(callbacks),
                           cfg=SimpleNamespace(time_limit=60 if callbacks else None)), transfer.FreezeBackbone(frozen_epochs)


def test_freeze_epochs_covering_the_run_warn_instead_of_promising_an_unfreeze(capsys):
    from imgclf.engine.callbacks import TimeBudget

    log.reset()
    t, cb = _trainer(20, 5)  # --freeze-epochs 5 --epochs 2
    cb.on_train_start(t)
    assert "--freeze-epochs 5 covers the whole run of 2 epoch(s): only the head trains" in capsys.readouterr().err
    t.step = 20
    cb.on_train_end(t)
    assert "warning" not in capsys.readouterr().err  # said once

    t, cb = _trainer(30, 1)  # fine: unfrozen after 10 steps
    cb.on_train_start(t)
    assert "warning" not in capsys.readouterr().err

    # --time-limit without --epochs: the length is planned later, always past the frozen phase ...
    budget = TimeBudget(time.perf_counter() + 100)
    t, cb = _trainer(20, 5, [budget])
    cb.on_train_start(t)
    assert "warning" not in capsys.readouterr().err
    t.step = 37  # ... but the deadline came first
    cb.on_train_end(t)
    assert "ended at step 37, within the 50 head-only steps of --freeze-epochs 5: the backbone was never trained " \
           "(lower --freeze-epochs or raise --time-limit)" in capsys.readouterr().err
    # an --epochs cap under --time-limit is known at the start
    budget = TimeBudget(time.perf_counter() + 100, max_steps=20)
    t, cb = _trainer(20, 5, [budget])
    log.reset()
    cb.on_train_start(t)
    assert "covers the whole run" in capsys.readouterr().err


def test_head_only_run_logs_no_unfreeze(small_sample, tmp_path, capsys):
    import imgclf

    log.reset()
    seen = []
    from imgclf.engine.callbacks import Callback

    class Probe(Callback):
        def on_epoch_end(self, t, row):
            seen.append(t.model.backbone_frozen)

    imgclf.train(data=str(small_sample), model="timm:resnet18", model_args={"small_stem": False}, head="",
                 image_size=32, epochs=1, freeze_epochs=2, batch_size=100, val_split=0.0, project=str(tmp_path),
                 name="headonly", progress=False, tensorboard=False, tta=False, callbacks=[Probe()])
    err = capsys.readouterr().err
    assert seen == [True]
    assert "then all at backbone lr" not in err and "backbone frozen for the whole run" in err
    assert "warning: --freeze-epochs 2 covers the whole run of 1 epoch(s)" in err


def test_freezing_an_own_net_says_it_needs_a_timm_model(tmp_path):
    # was: "add --pretrained, --weights FILE or --head", though --weights was given and the others are refused
    w = _fake_run(tmp_path / "fn", "fastnet", 10, 32)
    for option in ({"freeze_epochs": 1}, {"freeze_stages": 1}):
        with pytest.raises(UserError, match=r"--freeze-(epochs|stages) works only with timm models \(--model timm:NAME"):
            _transfer_model("fastnet", str(w), 32, **option)
