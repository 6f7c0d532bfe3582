"""Training details a careful user relies on: EMA warm-up, cutout size, loss scales, batches of
one, sync-BN on timm nets, what freezing a stage means, settings that contradict each other."""

from __future__ import annotations

import pytest
import timm
import torch

import imgclf
from imgclf.data.augment import AugmentSpec, BatchAugment, Normalize
from imgclf.engine import callbacks as cb
from imgclf.errors import UserError
from imgclf.models.head import HeadedNet

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def test_ema_warms_up_so_a_short_run_does_not_keep_its_first_steps():
    from imgclf.engine.trainer import _ema_with_warmup

    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_with_warmup(0.999), use_buffers=True)
    ema.update_parameters(model)  # the first update copies the step-1 weights (zeros)
    with torch.no_grad():
        model.weight.fill_(1.0)  # then training moves them
    for _ in range(20):
        ema.update_parameters(model)
    # warm-up decays (1+n)/(10+n), n = 1..20: the average has moved ~70% of the way; torch's fixed
    # 0.999 would have moved 1 - 0.999^20 = 2%, and after a 600-step run still hold 55% of step 1
    assert float(ema.module.weight.detach().mean()) > 0.6
    for _ in range(5000):
        ema.update_parameters(model)
    assert float(ema.module.weight.detach().mean()) == pytest.approx(1.0, abs=1e-3)


def test_ema_trains_a_batchnorm_net_and_saves_the_average(small_sample, tmp_path):
    # BatchNorm's integer num_batches_tracked is among the averaged buffers: lerp has no integer
    # kernel, and every --ema run of a net with BatchNorm died at its first step
    from safetensors.torch import load_file

    res = imgclf.train(data=str(small_sample), project=str(tmp_path), ema=0.9, val_split=0.2, **FAST)
    saved = load_file(str(res.run_dir / "model.safetensors"))
    counts = {k: int(v) for k, v in saved.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {5}  # copied from the trained net: 320 images / 64
    assert res.history[-1]["val_acc"] > 0.1 and res.test["top1"] > 0.1


def test_cutout_erases_a_square_of_exactly_the_given_side():
    spec = AugmentSpec(flip=False, translate=0, cutout=8)
    aug = BatchAugment(spec, Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu")), num_classes=10)
    x = torch.ones(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = aug._cutout(x, g)
    erased = (out[:, 0] == 0).sum((1, 2))
    # squares centred well inside the image are 8 x 8; those near an edge are cut by it
    assert erased.max().item() == 64 and (erased <= 64).all()


def test_one_image_left_for_a_last_batch_is_dropped():
    from imgclf.api import _drop_last

    assert _drop_last(129, 64) and _drop_last(1000, 64)  # 129 = 2 x 64 + 1; and large data
    assert not _drop_last(130, 64)  # a last batch of 2 trains fine
    assert _drop_last(258, 128, world=2)  # 129 per rank in batches of 64: 1 left on each rank
    assert not _drop_last(1, 16)  # a single image is a batch of one or nothing at all: kept


def test_multilabel_val_loss_is_on_the_training_loss_scale(small_sample, tmp_path):
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), task="multilabel", epochs=2,
                       progress=False, tensorboard=False, batch_size=64)
    last = res.history[-1]
    # both summed over the 10 labels: a mean over labels would read ~10x smaller
    assert 0.3 < last["val_loss"] / last["train_loss"] < 3, last
    assert res.config.label_smoothing == 0.0  # multi-label losses have none: config.yaml says so


def test_settings_that_contradict_each_other_fail_or_warn_up_front(small_sample, tmp_path, capfd):
    with pytest.raises(UserError, match="over-correct"):
        imgclf.train(data=str(small_sample), project=str(tmp_path), sampler="balanced", class_weights="balanced",
                     **FAST)
    with pytest.raises(UserError, match="--translate 32 must be smaller than the image size"):
        imgclf.train(data=str(small_sample), project=str(tmp_path), translate=32, **FAST)
    imgclf.train(data=str(small_sample), project=str(tmp_path), task="multilabel", label_smoothing=0.1, **FAST)
    assert "--label-smoothing 0.1 is ignored" in capfd.readouterr().err


def _headed(name: str, n_stages: int) -> HeadedNet:
    backbone = timm.create_model(name, pretrained=False, num_classes=0)
    net = HeadedNet(backbone, backbone.num_features, 10)
    net.freeze_stages(n_stages)
    return net


def test_freeze_stages_counts_resnet_layers_not_its_stem():
    net = _headed("resnet18", 1)
    frozen = {n for n, p in net.backbone.named_parameters() if not p.requires_grad}
    assert any(n.startswith("layer1.") for n in frozen) and "conv1.weight" in frozen
    assert not any(n.startswith("layer2.") for n in frozen)
    with pytest.raises(UserError, match=r"this backbone has 4 stages \(layer1, layer2, layer3, layer4\)"):
        _headed("resnet18", 5)


def test_sync_bn_keeps_timm_activations_and_frozen_stages_live():
    from timm.layers import BatchNormAct2d

    from imgclf.engine.distributed import convert_sync_bn

    net = _headed("efficientnet_lite0", 2)
    acts = [type(m.act).__name__ for m in net.modules() if isinstance(m, BatchNormAct2d)]
    net = convert_sync_bn(net)
    synced = [m for m in net.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert synced and [type(getattr(m, "act", None)).__name__ for m in synced] == acts  # ReLU6 kept
    live = {id(m) for m in net.modules()}
    assert net._stage_frozen and all(id(m) in live for m in net._stage_frozen)
    net.train()
    assert all(not m.training for m in net._stage_frozen)


def test_an_explicit_ram_budget_is_shared_by_train_and_val(small_sample, tmp_path, monkeypatch):
    from imgclf.data import loader

    made = []
    real = loader.BatchLoader.__init__

    def spy(self, data, *a, **k):
        real(self, data, *a, **k)
        made.append((data.nbytes, k.get("ram_budget"), self.resident))

    monkeypatch.setattr(loader.BatchLoader, "__init__", spy)
    # 200 + 200 images at 32 px (0.6 MB each) and a 1.2-MB budget: val gets what train left
    imgclf.train(data=str(small_sample), project=str(tmp_path), ram_budget=1.2 / 1024, val_split=0.5, **FAST)
    (train_bytes, train_budget, train_res), (val_bytes, val_budget, _) = made[:2]
    assert train_res and val_budget == train_budget - train_bytes


def test_vit_position_embedding_takes_no_decay_and_freezes_with_the_first_stages():
    net = _headed("vit_tiny_patch16_224", 2)
    no_decay = {id(p) for g in net.param_groups() if g.get("wd_scale") == 0.0 for p in g["params"]}
    assert id(net.backbone.pos_embed) in no_decay and id(net.backbone.cls_token) in no_decay
    assert not net.backbone.pos_embed.requires_grad and not net.backbone.patch_embed.proj.weight.requires_grad
    assert net.backbone.blocks[-1].mlp.fc1.weight.requires_grad


def test_resume_on_a_different_number_of_processes_continues_the_same_run(small_sample, tmp_path):
    # a 1-process run killed after its first epoch, resumed with --devices 2 (a bigger machine):
    # the global batch and the shuffle order are the run's own, so it ends where the
    # uninterrupted 1-process run does (the set-up of tests/test_distributed.py: fp32, SGD, no
    # BatchNorm and no random augmentation, so only float rounding differs)
    import numpy as np
    from safetensors.numpy import load_file

    from imgclf.config import make_config
    from imgclf.engine.callbacks import Callback

    opts = dict(data=str(small_sample), model="plaincnn", image_size=32, epochs=2, batch_size=32,
                model_args={"channels": [8, 16], "dense": [], "dropout": 0.0, "batchnorm": False},
                precision="fp32", flip=False, translate=0, tta=False, tensorboard=False, progress=False,
                optimizer="sgd", project=str(tmp_path))

    class Crash(Callback):
        def on_epoch_start(self, t, epoch):
            if epoch == 1:
                raise RuntimeError("simulated crash")

    whole = imgclf.train(**opts, name="whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        imgclf.train(**opts, name="killed", callbacks=[Crash()])
    with pytest.raises(UserError, match="does not divide"):
        imgclf.train(resume=tmp_path / "killed", devices=3, progress=False)
    res = imgclf.train(resume=tmp_path / "killed", devices=2, progress=False)
    assert len(res.history) == 2 and make_config(res.run_dir / "config.yaml").devices == 2
    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(res.run_dir / "model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6


def _flat_colour_data(root, n_per_class: int = 18):
    """Each image one random RGB colour, 3 classes: a degenerate but legal data set (blank scans,
    solid-colour product shots, masks): every 2x2 patch is flat, so the patch covariance behind
    fastnet's whitening stem has rank 3 of 12."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3))).save(root / c / f"{i}.png")
    return root


def test_flat_colour_images_train_to_finite_losses(tmp_path):
    import math

    data = _flat_colour_data(tmp_path / "flat")
    # the defaults (fastnet, muon, lookahead), in bf16 as auto picks on CPUs with native bf16 and
    # on GPUs: with BatchNorm eps 1e-12 the loss was nan from epoch 1 and a nan model was written
    res = imgclf.train(data=str(data), project=str(tmp_path / "runs"), epochs=2, precision="bf16",
                       progress=False, tensorboard=False, final_eval=False)
    losses = [r[k] for r in res.history for k in ("train_loss", "val_loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), res.history
    # and not merely finite: 3 indistinguishable classes, so about ln 3, not the 1e7 of a net
    # whose BatchNorm shifts were blown up by amplified gradients
    assert all(v < 3 for v in losses), res.history


class _PoisonAfterFirstEpoch(cb.Callback):
    """Makes the second epoch's loss nan, deterministically: the weights go nan before it."""

    def on_epoch_start(self, t, epoch):
        if epoch == 1:
            with torch.no_grad():
                t.model.head.weight.fill_(float("nan"))


# the end-of-epoch check, the progress bar's, and checkpoints within the epoch (one after every
# step): none is written from the nan steps
@pytest.mark.parametrize("progress, minutes", [(False, 10), (True, 10), (False, 1e-9)])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, progress, minutes):
    import math

    data = _flat_colour_data(tmp_path / "flat", n_per_class=12)
    run = tmp_path / "runs" / "nan"
    with pytest.raises(UserError, match=r"diverged in epoch 2 .*lower --lr .*last\.pt keeps the last good epoch") \
            as info:
        imgclf.train(data=str(data), project=str(tmp_path / "runs"), name="nan", epochs=3, precision="fp32",
                     progress=progress, tensorboard=False, checkpoint_minutes=minutes,
                     callbacks=[_PoisonAfterFirstEpoch()])
    assert "\n" not in str(info.value)
    assert "--precision fp32" not in str(info.value)  # the run is fp32 already
    assert not (run / "model.safetensors").exists()  # no worthless model
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1 and ckpt.get("in_epoch") is None
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert all(math.isfinite(r["train_loss"]) for r in ckpt["history"])


def test_an_overflowing_lr_fails_in_epoch_1_and_names_bf16(tmp_path):
    data = _flat_colour_data(tmp_path / "flat", n_per_class=12)
    with pytest.raises(UserError, match=r"diverged in epoch 1 .*lower --lr \(it is 1e\+30\).*--precision fp32"):
        imgclf.train(data=str(data), project=str(tmp_path / "runs"), epochs=1, optimizer="sgd", lr=1e30,
                     precision="bf16", progress=False, tensorboard=False)


@pytest.mark.parametrize("option, value", [
    ("lr", "inf"), ("lr", float("nan")), ("time_limit", "inf"), ("time_limit", "infm"), ("weight_decay", float("inf")),
    ("momentum", float("nan")), ("beta2", "nan"), ("eps", "inf"), ("ram_budget", float("inf")), ("epochs", "inf"),
    ("mixup", float("inf")), ("clip_grad", float("inf")),
])
def test_float_options_must_be_finite(option, value):
    from imgclf.config import make_config

    with pytest.raises(UserError, match=rf"option '{option}': .*finite") as info:
        make_config(data="d", **{option: value})
    assert "\n" not in str(info.value)


def test_lookahead_on_a_run_shorter_than_one_pull_keeps_what_it_trained():
    from types import SimpleNamespace

    # a handful of images gives 1-4 steps in all: the slow copy was never pulled, and ending on it
    # handed back the untrained initial weights
    model = torch.nn.Linear(4, 2)
    t = SimpleNamespace(model=model, step=0, total_steps=3)
    la = cb.Lookahead()
    la.on_train_start(t)
    init = model.weight.detach().clone()
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)  # what the optimiser step did
        t.step = step
        la.on_step_end(t)
    assert torch.equal(model.weight, init + 3)
    # a run of 10 steps ends on the slow copy: pulled at step 5, then taken at the end
    model = torch.nn.Linear(4, 2)
    t = SimpleNamespace(model=model, step=0, total_steps=10)
    la = cb.Lookahead()
    la.on_train_start(t)
    init = model.weight.detach().clone()
    for step in range(1, 11):
        with torch.no_grad():
            model.weight.add_(1.0)
        t.step = step
        la.on_step_end(t)
    # pulled at steps 5 and 10 (decays 0.774 x 0.125 and 0.774: 4.52, then 5.65), then taken
    assert float((model.weight - init).mean().detach()) == pytest.approx(5.65, abs=0.01)


def test_an_explicit_ram_budget_covers_every_split_held_at_once(small_sample, tmp_path, monkeypatch):
    """--ram-budget is for all decoded copies together: train and val stay held while the test
    split is scored, so the test split gets what they leave (a review found 300 MiB held against
    a 256 MiB budget); standalone evaluate keeps to the run's own budget."""
    import imgclf.api as api
    from imgclf.data import loader as loader_mod

    made = []

    class Spy(loader_mod.BatchLoader):
        def __init__(self, data, *a, **k):
            super().__init__(data, *a, **k)
            made.append((len(data), self.resident, k.get("ram_budget")))

    monkeypatch.setattr(api, "BatchLoader", Spy)
    per_image = 32 * 32 * 3
    budget = (360 + 40 + 20) * per_image  # train (360) and val (40) fit, and 20 images more
    res = imgclf.train(data=str(small_sample), val_split=0.1, image_size=32, ram_budget=budget / 2**30,
                       project=str(tmp_path), **FAST)
    by_len = {n: resident for n, resident, _ in made}
    assert by_len[360] and by_len[40]  # held
    assert by_len[100] is False  # the 100 test images exceed what is left: streamed
    made.clear()
    imgclf.evaluate(res.run_dir, progress=False)
    assert [(n, b) for n, _, b in made] == [(100, pytest.approx(budget, abs=2))]  # the run's budget, not the default


def test_predict_decodes_ahead_a_bounded_number_of_bytes(tiny_run, sample_dir, monkeypatch):
    import numpy as np

    import imgclf.api as api

    files = sorted((sample_dir / "test").rglob("*.jpg"))[:10]
    clf = imgclf.load(tiny_run)
    whole = clf.predict(files)
    calls = []
    real = clf.predict_proba
    monkeypatch.setattr(clf, "predict_proba", lambda x, tta=False: calls.append(len(x)) or real(x, tta))
    monkeypatch.setattr(api, "PREDICT_CHUNK_BYTES", 4 * clf.image_size ** 2 * 3)
    chunked = clf.predict(files)
    assert calls == [4, 4, 2]
    for a, b in zip(whole, chunked):
        assert a["input"] == b["input"]
        np.testing.assert_allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=1e-6)


@pytest.mark.parametrize("arch,size,batch", [("fastnet", 32, 1024), ("fastnet", 128, 1024), ("fastnet", 256, 256),
                                             ("timm:resnet18", 224, 64), ("timm:resnet18", 256, 32),
                                             ("timm:resnet18", 512, 8), ("plaincnn", 1024, 8)])
def test_the_default_batch_keeps_the_pixels_per_step_for_large_images(arch, size, batch):
    from imgclf.config import TrainConfig
    from imgclf.engine import recipe

    assert recipe.resolve(TrainConfig(data="x"), n_train=50_000, image_size=size, arch=arch).batch_size == batch


def test_a_full_disk_while_writing_the_model_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from imgclf import runs

    def full(state, path):  # a partial file, then the disk fills
        open(path, "w").write("partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match="no space left on device writing .*model.safetensors"):
        runs.write_model(tmp_path, torch.nn.Linear(2, 2), {"classes": ["a", "b"]})
    assert list(tmp_path.iterdir()) == []


def test_an_epoch_that_ties_the_best_accuracy_with_a_lower_val_loss_becomes_the_best(tmp_path):
    # a 40-image val split moves in steps of 2.5%: epoch 3 and epoch 7 both at 0.85, the later
    # one (trained longer, at a lower lr) with the lower loss; the earlier used to be restored
    from types import SimpleNamespace

    from imgclf.engine import trainer as tr

    saved = []
    fake = SimpleNamespace(cfg=SimpleNamespace(monitor="val_acc", min_delta=0.0), best=None, best_epoch=None,
                           run_dir=tmp_path, is_main=True, history=[], eval_model=lambda: torch.nn.Linear(2, 2))
    fake._ties_with_lower_loss = lambda m, row: tr.Trainer._ties_with_lower_loss(fake, m, row)
    for epoch, acc, loss in ((1, 0.6, 1.2), (3, 0.85, 0.52), (5, 0.825, 0.45), (7, 0.85, 0.41), (8, 0.85, 0.47)):
        row = {"epoch": epoch, "val_acc": acc, "val_loss": loss}
        fake.history.append(row)
        tr.Trainer._track_best(fake, row)
        saved.append(fake.best_epoch)
    assert saved == [1, 3, 3, 7, 7]  # a tie with a higher loss (epoch 8) does not move it
    assert fake.best == 0.85 and (tmp_path / "best.safetensors").exists()
    # a loss monitor has no tie-break to make
    fake.cfg.monitor, fake.best, fake.best_epoch = "val_loss", 0.41, 7
    assert tr.Trainer._ties_with_lower_loss(fake, "val_loss", {"epoch": 9, "val_loss": 0.41}) is False
