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


def _fake_run(folder: Path, arch: str, classes: int | list[str], size: int, args: dict | None = None) -> Path:
    """An imgclf run folder as train leaves it (model.safetensors + model.json), without training;
    ``classes`` a count (named "0", "1", ...) or the names."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    arch_args = arch_args_for_record(arch, size, dict(args or {}))
    names = [str(i) for i in range(classes)] if isinstance(classes, int) else list(classes)
    torch.manual_seed(0)
    model = build_model(arch, len(names), size, arch_args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({
        "format": "imgclf.model/1", "architecture": arch, "arch_args": arch_args, "classes": names,
        "task": "single", "image_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "weights": "model.safetensors"}))
    return folder / "model.safetensors"


def _transfer_model(arch: str, weights: str, size: int, classes: int | list[str] = 10, **options):
    """What api.train builds from --weights: plan, arch args (the user's --model-args laid over),
    the model, and the weights loaded into it; ``classes`` a count, or this run's class names."""
    cfg = make_config(None, data="d", model=arch, weights=weights, **options)
    source = pretrained.plan(arch, weights, False)
    args = arch_args_for_record(arch, size, {**transfer.transfer_arch_args(arch, cfg, source), **cfg.model_args})
    names = None if isinstance(classes, int) else list(classes)
    model = build_model(arch, len(names) if names else classes, size, args)
    transfer.setup_transfer(model, arch, cfg, source, classes=names)
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


def test_an_own_nets_output_rows_follow_the_class_names(tmp_path, capsys):
    from safetensors.torch import load_file

    w = _fake_run(tmp_path / "abc", "fastnet", ["a", "b", "c"], 32, {"width": 0.5})
    saved = load_file(str(w))["head.weight"]
    model, _ = _transfer_model("fastnet", str(w), 32, classes=["c", "a", "b"])  # the same classes, another order
    assert torch.equal(model.head.weight, saved[[2, 0, 1]])  # was: kept as it was, each row scoring another class
    assert "the output layer keeps the trained rows of 3 of 3 classes, matched by name" in capsys.readouterr().err
    # the same count, none of the names: was kept whole, the rows of a, b, c scoring x, y, z
    model, _ = _transfer_model("fastnet", str(w), 32, classes=["x", "y", "z"])
    assert not any(torch.equal(model.head.weight[j], saved[i]) for i in range(3) for j in range(3))
    assert ("none of the run's classes (a, b, c) is among these: a new output layer is trained"
            in capsys.readouterr().err)


def test_fastnet_fine_tunes_a_run_trained_on_other_classes(small_sample, tmp_path, capsys):
    import imgclf
    from imgclf.engine.callbacks import Callback

    w = _fake_run(tmp_path / "fn3", "fastnet", ["dog", "cat", "plane"], 32)  # two of CIFAR's names, one other

    class First(Callback):
        def on_train_start(self, t):
            self.conv = t.model.layers[0].conv1.weight.detach().clone()
            self.whiten = t.model.whiten.weight.detach().clone()
            self.out = t.model.head.weight.detach().clone()

    first = First()
    res = imgclf.train(data=str(small_sample), model="fastnet", weights=str(w), image_size=32, epochs=1,
                       val_split=0.0, project=str(tmp_path), name="ft", progress=False, tensorboard=False, tta=False,
                       callbacks=[first])
    from safetensors.torch import load_file

    state = load_file(str(w))
    assert torch.equal(first.conv, state["layers.0.conv1.weight"])  # the earlier run's features
    # and the whitening stem they were trained on: it was recomputed from the new data, flipping filters' signs
    assert torch.equal(first.whiten, state["whiten.weight"])
    classes = json.loads((res.run_dir / "model.json").read_text())["classes"]
    assert len(classes) == 10
    # the output rows of the classes both runs have, by name: was a new output layer for all ten
    cat, dog = classes.index("cat"), classes.index("dog")
    assert torch.equal(first.out[cat], state["head.weight"][1]) and torch.equal(first.out[dog], state["head.weight"][0])
    assert ("--weights: the output layer keeps the trained rows of 2 of 10 classes, matched by name; 8 new class(es) "
            "start fresh (airplane, automobile, bird, deer, frog, ...); 1 of the run's classes are not in this data"
            in capsys.readouterr().err)


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
    # timm.is_model ignores the tag: an unknown one was a RuntimeError from create_model, after decoding
    with pytest.raises(UserError, match=r"resnet18 has no tag 'bogus'; tags with weights: .*resnet18\.a1_in1k"):
        imgclf.train(data=str(small_sample), model="timm:resnet18.bogus", project=str(tmp_path), progress=False,
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


# -- 9. weights files as people save them ------------------------------------------------------


def _small_state(name="test_resnet"):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7).state_dict()


def test_weights_files_are_read_by_their_contents_and_bad_ones_are_one_line(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = _small_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "st.pt"))  # safetensors named .pt
    torch.save(state, tmp_path / "torch.safetensors")  # and a torch file named .safetensors
    for name in ("st.pt", "torch.safetensors"):  # were: UnpicklingError / SafetensorError 'header too large'
        got = pretrained.read_state_dict(tmp_path / name)
        assert set(got) == set(state) and torch.equal(got["fc.weight"], state["fc.weight"]), name

    torch.save(timm.create_model("test_resnet"), tmp_path / "whole.pt")  # torch.save(model)
    torch.save(state, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:5000])
    (tmp_path / "half.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:-5000])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({**state, "epoch": 3}, tmp_path / "mixed.pt")
    for name, want in (("whole.pt", r"pickled Python objects \(timm\.models\.resnet\.ResNet\).*"
                                    r"torch\.save\(model\.state_dict\(\), 'weights\.pt'\)"),
                       ("cut.pt", r"cannot read it as a torch file: it is cut short or corrupt( \(.*\))?; download"),
                       ("half.pt", r"it is cut short or corrupt \(PytorchStreamReader failed reading zip archive: "
                                   r"failed finding central directory\); download or save it again$"),
                       ("empty.pt", r"the file is empty$"),
                       ("mixed.pt", r"expected a mapping of parameter names to tensors \(it holds epoch: a checkpoint")):
        with pytest.raises(UserError, match=want) as e:
            pretrained.read_state_dict(tmp_path / name)
        assert "\n" not in str(e.value) and "\x1b" not in str(e.value), name


def test_weights_of_another_architecture_say_so(tmp_path, capsys):
    torch.save(_small_state("test_efficientnet"), tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"check --model matches the weights \(only \d+ of its \d+ fit: weights of "
                                        r"another architecture\?\)"):
        _transfer_model("timm:test_resnet", str(tmp_path / "w.pt"), 32)
    assert "ignored" not in capsys.readouterr().err  # no 'classifier tensors ignored' before the refusal


def test_a_model_folder_or_run_folder_as_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    state = _small_state()
    hf = tmp_path / "hf"  # a Hugging Face style folder: config.json + model.safetensors
    hf.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"architecture": "test_resnet", "num_classes": 7}))
    model, _ = _transfer_model("timm:test_resnet", str(hf), 32)  # was: 'no such file'
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert pretrained.plan("timm:test_resnet", str(hf), True).source == f"file:{hf / 'model.safetensors'}"
    assert "--pretrained is ignored: the weights come from --weights" in capsys.readouterr().err

    w = _fake_run(tmp_path / "run", "timm:test_resnet", 3, 32)  # an imgclf run folder: its model.json's file
    assert pretrained.plan("timm:test_resnet", str(w.parent), False).source == f"file:{w}"
    pretrained.check_available("timm:test_resnet", make_config(None, data="d", weights=str(w.parent)))
    # the same run under its tagged name brings its record too (a tag changes no layer)
    assert pretrained.plan("timm:test_resnet.r160_in1k", str(w), False).arch_args == {"small_stem": True}

    (tmp_path / "none").mkdir()
    with pytest.raises(UserError, match=r"a folder without a weights file \(looked for model\.safetensors, "
                                        r"pytorch_model\.bin"):
        pretrained.check_available("timm:test_resnet", make_config(None, data="d", weights=str(tmp_path / "none")))
    (w.parent / "model.safetensors").rename(w.parent / "best.safetensors")
    # the run's best epoch: the same network as its model.safetensors (was: built without its small stem)
    assert pretrained.plan("timm:test_resnet", str(w.parent / "best.safetensors"), False).arch_args == {"small_stem": True}
    (w.parent / "config.yaml").write_text("data: d\n")
    (w.parent / "last.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"this run has no model\.safetensors yet .*imgclf train --resume"):
        pretrained.plan("timm:test_resnet", str(w.parent), False)


def test_another_models_run_is_refused_before_the_data_is_read(tmp_path):
    # was: accepted, then hundreds of mismatched tensors once the data was decoded
    w = _fake_run(tmp_path / "fn", "fastnet", 10, 32)
    with pytest.raises(UserError, match=r"these are the weights of a fastnet run \(.*fn\), not of timm:test_resnet: "
                                        r"add --model fastnet"):
        pretrained.plan("timm:test_resnet", str(w), False)


def test_a_vits_weights_saved_at_another_size_are_resampled(tmp_path):
    import timm

    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "vit.pt")  # its 160-px grid: 10x10 patches
    model, _ = _transfer_model("timm:test_vit", str(tmp_path / "vit.pt"), 64)  # was: pos_embed (1, 101, ..) vs ..
    grid = model.backbone.patch_embed.grid_size
    assert model.backbone.pos_embed.shape[1] == grid[0] * grid[1] + model.backbone.num_prefix_tokens < 101


# -- 10. fine-tuning from an earlier timm run keeps its head --------------------------------------


def test_a_timm_runs_head_comes_along_unless_the_layers_differ(tmp_path, capsys):
    from safetensors.torch import load_file

    w = _fake_run(tmp_path / "r", "timm:test_resnet", 3, 32, {"head": [16], "head_dropout": 0.1})
    saved = load_file(str(w))
    model, args = _transfer_model("timm:test_resnet", str(w.parent), 32, classes=3)  # same classes, no --head
    assert args["head"] == [16]  # was: [] (a new linear head), the trained one thrown away
    assert all(torch.equal(v, saved[f"head.{k}"]) for k, v in model.head.state_dict().items())
    assert "the run's head is kept (same layers and class count)" in capsys.readouterr().err

    model, _ = _transfer_model("timm:test_resnet", str(w), 32, classes=5)  # other classes: a new output layer
    assert torch.equal(model.head[1].weight, saved["head.1.weight"]) and model.head[4].weight.shape[0] == 5
    assert "kept but for its output layer" in capsys.readouterr().err

    # this run's class names given (as train gives them): output rows follow the names
    model, _ = _transfer_model("timm:test_resnet", str(w), 32, classes=["2", "new", "0"])
    assert torch.equal(model.head[1].weight, saved["head.1.weight"])  # the hidden layer, as it was trained
    out_w, out_b = model.head[4].weight, model.head[4].bias
    assert torch.equal(out_w[0], saved["head.4.weight"][2]) and torch.equal(out_w[2], saved["head.4.weight"][0])
    assert torch.equal(out_b[[0, 2]], saved["head.4.bias"][[2, 0]])
    assert not any(torch.equal(out_w[1], saved["head.4.weight"][i]) for i in range(3))
    assert ("the run's head is kept; the output layer keeps the trained rows of 2 of 3 classes, matched by name; "
            "1 new class(es) start fresh (new); 1 of the run's classes are not in this data") in capsys.readouterr().err
    _transfer_model("timm:test_resnet", str(w), 32, classes=["0", "1", "2"])
    assert "the run's head is kept (same layers and classes)" in capsys.readouterr().err

    model, args = _transfer_model("timm:test_resnet", str(w), 32, classes=3, head=[8])  # the user's --head wins
    assert args["head"] == [8] and model.head[1].weight.shape == (8, model.head[1].weight.shape[1])
    assert "a new head is trained" in capsys.readouterr().err


def test_fine_tuning_from_a_run_folder_trains_on_from_its_weights(small_sample, tmp_path):
    from safetensors.torch import load_file

    import imgclf
    from imgclf.engine.callbacks import Callback

    w = _fake_run(tmp_path / "prev", "timm:test_resnet", 10, 32, {"head": [16], "small_stem": False})  # fast at 32 px

    class First(Callback):
        def on_train_start(self, t):
            self.state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}

    first = First()
    res = imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(w.parent), image_size=32, epochs=1,
                       val_split=0.0, batch_size=100, project=str(tmp_path), name="ft", progress=False,
                       tensorboard=False, tta=False, callbacks=[first], final_eval=False)
    saved = load_file(str(w))
    assert all(torch.equal(v, saved[k]) for k, v in first.state.items())  # backbone and head, stats included
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert meta["arch_args"]["head"] == [16] and meta["weights_source"] == f"file:{w}"
    from imgclf.runs import load_model

    load_model(res.run_dir)  # the new run loads from its own record


# -- 11. --freeze-stages counts stages, not the stem ----------------------------------------------


@pytest.mark.parametrize("arch,frozen,trained", [("timm:regnetx_002", "s2.", "s3."),
                                                 ("timm:mobilenetv3_small_050", "blocks.1.", "blocks.2."),
                                                 ("timm:resnet18", "layer2.", "layer3.")])
def test_freeze_stages_leaves_the_stem_out_of_the_count_and_names_the_last(arch, frozen, trained, capsys):
    # RegNet and MobileNetV3-Small list their stem as feature level 0: --freeze-stages 2 froze the stem
    # and one stage; and ResNet's log named layer1 while layer2 was frozen too
    cfg = make_config(None, data="d", model=arch, head=[], freeze_stages=2)
    model = build_model(arch, 10, 64, arch_args_for_record(arch, 64, transfer.transfer_arch_args(arch, cfg, None)))
    transfer.setup_transfer(model, arch, cfg, None)
    grads = {k: p.requires_grad for k, p in model.backbone.named_parameters()}
    assert not any(g for k, g in grads.items() if k.startswith(frozen)) and all(
        g for k, g in grads.items() if k.startswith(trained))
    err = capsys.readouterr().err
    assert f"(up to '{frozen[:-1]}'): {model.trainable_parameters():,} of " in err


def test_an_unreadable_weights_file_is_refused_before_the_data_is_read(small_sample, tmp_path, monkeypatch):
    # was: found only when the weights were loaded, after minutes of decoding on a large data set
    import timm

    import imgclf
    from imgclf import api

    torch.save(timm.create_model("test_resnet"), tmp_path / "whole.pt")
    torch.save(_small_state(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:-5000])
    monkeypatch.setattr(api, "load_source", lambda *a, **k: pytest.fail("data read before the weights were checked"))
    for name, want in (("whole.pt", "pickled Python objects"), ("cut.pt", "cut short or corrupt")):
        with pytest.raises(UserError, match=want):
            imgclf.train(data=str(small_sample), model="timm:test_resnet", weights=str(tmp_path / name),
                         project=str(tmp_path), progress=False, tensorboard=False)
