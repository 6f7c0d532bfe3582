"""End-to-end behaviour of the core: sources, cache, augmentation, trainer, run folder, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.config import make_config
from imgclf.data.augment import AugmentSpec, BatchAugment, Normalize, _crop_translate
from imgclf.data.cache import build_cache
from imgclf.data.sources import load_source
from imgclf.errors import UserError

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


# --- config -----------------------------------------------------------------------------------


def test_config_typo_names_the_key_and_suggests(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: x\nlerning_rate: 0.1\n")
    with pytest.raises(UserError) as e:
        make_config(cfg)
    msg = str(e.value)
    assert "lerning_rate" in msg and "\n" not in msg


def test_cli_config_typo_is_one_line_exit_2(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: x\nepocs: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epocs" in err[0] and "epochs" in err[0]


def test_cli_values_override_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    (tmp_path / "a").mkdir()  # beside the file: a data path that is not there is refused
    cfg.write_text("data: a\nepochs: 3\nlr: 0.5\n")
    c = make_config(cfg, epochs=7)
    assert c.epochs == 7 and c.lr == 0.5


def test_a_bad_override_is_not_blamed_on_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: a\nepochs: 3\n")
    # a bad command-line value (or one --resume passes on) used to read "run.yaml: option 'epochs'"
    with pytest.raises(UserError) as e:
        make_config(cfg, epochs=0)
    assert str(e.value).startswith("config: option 'epochs'") and "run.yaml" not in str(e.value)
    cfg.write_text("data: a\nepochs: 0\n")
    with pytest.raises(UserError, match=r"^.*run\.yaml: option 'epochs'"):
        make_config(cfg, lr=0.1)


def test_wrong_data_path_is_user_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- sources and cache ---------------------------------------------------------------------------


def test_folder_split_is_stratified_and_fixed(small_sample, tmp_path):
    a = load_source(str(small_sample), val_split=0.25, split_seed=3, cache_dir=tmp_path)
    b = load_source(str(small_sample), val_split=0.25, split_seed=3, cache_dir=tmp_path)
    assert a.val.paths == b.val.paths
    assert np.bincount(a.val.labels).tolist() == [10] * 10  # 25% of 40 per class
    assert len(a.test) == 100 and set(a.train.paths).isdisjoint(a.val.paths)


def test_val_split_stays_put_when_images_are_added_or_the_folder_moves(small_sample, tmp_path):
    # each image's side of the hold-out comes from its own name: one new cat moves at most the
    # cats at the boundary, no other class's split, and a moved copy of the data splits the same
    flat = tmp_path / "flat"
    shutil.copytree(small_sample / "train", flat)
    before = load_source(str(flat), val_split=0.2, split_seed=0, cache_dir=tmp_path / "c")
    other_seed = load_source(str(flat), val_split=0.2, split_seed=1, cache_dir=tmp_path / "c")
    assert set(other_seed.val.paths) != set(before.val.paths)
    shutil.copy(small_sample / "test" / "cat" / sorted(p.name for p in (small_sample / "test" / "cat").iterdir())[0],
                flat / "cat" / "added.jpg")
    after = load_source(str(flat), val_split=0.2, split_seed=0, cache_dir=tmp_path / "c")
    old_val, new_val = set(before.val.paths), set(after.val.paths)
    assert {p for p in old_val ^ new_val if "/cat/" not in p} == set()
    assert len(old_val - new_val) <= 1 and len(new_val - old_val) <= 2
    assert np.bincount(after.val.labels).tolist() == [8] * 10  # still 20% of each class (41 cats -> 8)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(flat, moved)
    again = load_source(str(moved), val_split=0.2, split_seed=0, cache_dir=tmp_path / "c")
    assert [os.path.relpath(p, moved) for p in again.val.paths] == [os.path.relpath(p, flat) for p in after.val.paths]


def test_multilabel_hold_out_is_by_name_too():
    from imgclf.data.sources import stratified_split

    labels = np.zeros((200, 3), np.float32)
    keys = [f"img{i:03d}.jpg" for i in range(200)]
    tr, va = stratified_split(labels, 0.1, 0, keys)
    assert len(va) == 20 and len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 200
    # the same images without the first ten rows: whichever of them were held out stay held out
    tr2, va2 = stratified_split(labels[10:], 0.1, 0, keys[10:])
    held, now = {keys[i] for i in va} - set(keys[:10]), {keys[10 + i] for i in va2}
    assert held <= now or now <= held  # both are the head of one hash order


def test_cache_decodes_once_and_is_keyed_by_size(small_sample, tmp_path, monkeypatch):
    src = load_source(str(small_sample), val_split=0, cache_dir=tmp_path)
    first = build_cache(src.test, 32, "stretch", tmp_path, progress=False)
    assert isinstance(first.images, np.memmap) and first.images.shape == (100, 32, 32, 3)
    import imgclf.data.cache as cache_mod

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache_mod, "load_resized", boom)
    again = build_cache(src.test, 32, "stretch", tmp_path, progress=False)
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    with pytest.raises(AssertionError, match="decoded again"):
        build_cache(src.test, 24, "stretch", tmp_path, progress=False)


def test_an_image_replaced_with_its_size_and_mtime_kept_is_decoded_again(tmp_path):
    # cp -p / rsync -a: new pixels, same byte size, same mtime; the cache must not serve the old ones
    from imgclf.data.sources import Split

    img = tmp_path / "a.bmp"  # BMP: the byte size depends on the dimensions only
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(img)
    split = Split(labels=np.zeros(1, np.int64), paths=[str(img)])
    old = build_cache(split, 8, "stretch", tmp_path / "c", workers=1, progress=False)
    assert int(old.images[0, 0, 0, 0]) == 10
    st = img.stat()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    new = build_cache(split, 8, "stretch", tmp_path / "c", workers=1, progress=False)
    assert int(new.images[0, 0, 0, 0]) == 200
    assert np.array_equal(np.asarray(build_cache(split, 8, "stretch", tmp_path / "c", progress=False).images),
                          np.asarray(new.images))  # and reused from then on


def test_decoded_pixels_match_the_jpeg_in_rgb_order(sample_dir, tmp_path):
    src = load_source(str(sample_dir), val_split=0, cache_dir=tmp_path)
    cs = build_cache(src.test, 32, "stretch", tmp_path, progress=False)
    i = 5
    ref = np.asarray(Image.open(src.test.paths[i]).convert("RGB"))
    assert np.array_equal(cs.images[i], ref)


@pytest.fixture()
def messy_folder(small_sample, tmp_path) -> Path:
    """Real images plus every kind of bad or unusual file a user's folder holds."""
    root = tmp_path / "messy"
    shutil.copytree(small_sample / "train", root)
    cat = root / "cat"
    good = sorted(cat.glob("*.jpg"))[0]
    data = good.read_bytes()
    (cat / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.jpg").write_text("this is not an image")
    img = Image.open(good).convert("RGB")
    img.convert("CMYK").save(cat / "cmyk.jpg")
    arr16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(cat / "gray16.png")
    img.convert("RGBA").save(cat / "rgba.png")
    img.convert("P").save(cat / "palette.png")
    (root / "empty_class").mkdir()
    return root


def test_messy_folder_trains_and_reports_each_problem_once(messy_folder, tmp_path, capsys):
    res = imgclf.train(data=str(messy_folder), project=str(tmp_path / "runs"), val_split=0.2, **FAST)
    err = capsys.readouterr().err
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg"):
        assert err.count(name) == 1, (name, err)
    assert err.count("empty_class") == 1
    for fine in ("cmyk.jpg", "gray16.png", "rgba.png", "palette.png"):
        # unusual modes are converted, not rejected (the data check may still, rightly, call
        # them near-duplicates of the image they were made from)
        assert not any(fine in line and "unreadable" in line for line in err.splitlines()), fine
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert "empty_class" not in meta["classes"] and len(meta["classes"]) == 10


# --- augmentation -----------------------------------------------------------------------------------


def test_translate_gather_equals_reflect_pad_and_crop():
    x = torch.randint(0, 255, (6, 8, 8, 3), dtype=torch.uint8)
    oy, ox = torch.tensor([0, 1, 2, 3, 4, 2]), torch.tensor([4, 3, 2, 1, 0, 2])
    out = _crop_translate(x, 2, oy, ox)
    padded = torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect")
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8].permute(1, 2, 0).to(torch.uint8)
        assert torch.equal(out[i], ref)
    assert torch.equal(out[5], x[5])  # offset == pad is the identity


def test_augment_normalises_and_keeps_labels():
    norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], torch.device("cpu"))
    x = torch.full((4, 8, 8, 3), 255, dtype=torch.uint8)
    out = norm(x)
    assert out.shape == (4, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, torch.full_like(out, 2.0))
    aug = BatchAugment(AugmentSpec(flip=True, translate=1, rotate=10, zoom=0.1, cutout=2, mixup=0.2), norm, 10)
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    xb, yb = aug(torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8), y, g)
    assert xb.shape == (16, 3, 8, 8) and yb.shape == (16, 10)
    assert torch.allclose(yb.sum(1), torch.ones(16))
    # mixup pairs each image with one partner of the same batch: a row holds its own class
    # (always some mass) and at most one other, and the batch's mass per class is its count
    assert (yb[torch.arange(16), y] > 0).all() and ((yb > 1e-6).sum(1) <= 2).all()
    assert torch.allclose(yb.sum(0), torch.bincount(y, minlength=10).float(), atol=1e-5)
    # without mixing the labels come back as they went in
    plain = BatchAugment(AugmentSpec(flip=True, translate=1, rotate=10, zoom=0.1, cutout=2), norm, 10)
    assert torch.equal(plain(torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8), y, g)[1], y)


# --- training, run folder, resume ----------------------------------------------------------------------


def test_run_folder_contents(tiny_run):
    for f in ("config.yaml", "metrics.csv", "model.safetensors", "model.json", "curves.png", "confusion.png",
              "confusion.csv", "metrics.json", "last.pt"):
        assert (tiny_run / f).exists(), f
    meta = json.loads((tiny_run / "model.json").read_text())
    assert meta["architecture"] == "fastnet" and meta["image_size"] == 32 and meta["resize"] == "stretch"
    assert len(meta["mean"]) == 3 and meta["classes"][0] == "airplane"
    rows = (tiny_run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc") and len(rows) == 3
    cfg = make_config(tiny_run / "config.yaml")
    assert cfg.epochs == 2 and cfg.lr is not None and cfg.batch_size is not None  # resolved, repeatable


def test_default_recipe_learns_the_sample(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["split"] == "test" and m["n"] == 1000
    assert m["top1"] > 0.30  # 2 epochs on 2,700 images; chance is 0.10


@pytest.mark.parametrize("model, args", [("fastnet", {}), ("plaincnn", {"channels": [16, 32], "dense": [32]})])
def test_resume_after_interrupt_ends_like_an_uninterrupted_run(small_sample, tmp_path, model, args):
    """Stopped at an epoch's end, or within an epoch (a checkpoint_minutes checkpoint holds the
    epoch's position and its augmentation and dropout generators; plaincnn's dense layers have
    dropout), and resumed, a run trains the same batches with the same draws and ends with the
    weights of one never stopped."""
    from imgclf.engine.callbacks import Callback

    opts = dict(data=str(small_sample), project=str(tmp_path), epochs=2, seed=3, model=model, model_args=args,
                **{k: v for k, v in FAST.items() if k != "epochs"})
    full = imgclf.train(name="full", **opts)

    class AtEpochEnd(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:  # last.pt holds epoch 1's end
                raise KeyboardInterrupt

    class WithinEpoch(Callback):
        def on_step_end(self, t):
            if t.step == t.steps_per_epoch + 3:  # after the checkpoint of epoch 2's second batch
                raise KeyboardInterrupt

    cuts = {"mid": (WithinEpoch(), 1e-9)}  # 1e-9 minutes: a checkpoint after every step
    if model == "fastnet":
        cuts["end"] = (AtEpochEnd(), 0)
    for name, (crash, minutes) in cuts.items():
        with pytest.raises(KeyboardInterrupt):
            imgclf.train(name=name, callbacks=[crash], **{**opts, "checkpoint_minutes": minutes})
        part = torch.load(tmp_path / name / "last.pt", weights_only=True).get("in_epoch")
        if name == "mid":
            assert (part["epoch"], part["batch"]) == (1, 2)
        else:
            assert part is None
        resumed = imgclf.train(resume=tmp_path / name, progress=False)
        a, b = _weights(full.run_dir), _weights(resumed.run_dir)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert [r["epoch"] for r in resumed.history] == [1, 2]
        for key in ("train_loss", "train_acc"):  # the resumed epoch's running figures went on from the checkpoint
            assert resumed.history[1][key] == pytest.approx(full.history[1][key], rel=1e-6), (name, key)


def test_ctrl_c_stops_after_the_step_in_progress_and_saves_it(small_sample, tmp_path, capfd):
    """Ctrl-C within an epoch: the step it came in finishes and is saved (no periodic checkpoint
    here), so --resume loses nothing and ends with the uninterrupted run's weights. A second
    Ctrl-C stops at once."""
    import signal

    from imgclf.engine.callbacks import Callback

    opts = dict(data=str(small_sample), project=str(tmp_path), epochs=2, seed=3, checkpoint_minutes=0,
                **{k: v for k, v in FAST.items() if k != "epochs"})

    class CtrlC(Callback):
        def __init__(self, at: int, times: int = 1):
            self.at, self.times = at, times

        def on_step_end(self, t):
            if t.step == self.at:
                for _ in range(self.times):
                    signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="cut", callbacks=[CtrlC(8)], **opts)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    # 5 steps an epoch (360 images, batch 64, the partial batch dropped): step 8 is epoch 2's third
    assert state["step"] == 8 and (state["in_epoch"]["epoch"], state["in_epoch"]["batch"]) == (1, 3)
    assert f"stopped: continue with imgclf.train(resume='{tmp_path / 'cut'}')" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    resumed = imgclf.train(resume=tmp_path / "cut", progress=False)
    full = imgclf.train(name="full", **opts)
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # twice: no step is finished, nothing is saved, and the new run's folder goes (nothing to resume)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="twice", callbacks=[CtrlC(2, times=2)], **opts)
    assert not (tmp_path / "twice").exists()


def test_checkpoint_minutes_zero_saves_at_epoch_ends_only(small_sample, tmp_path):
    from imgclf.engine.callbacks import Callback

    saves = []

    class Stop(Callback):
        def on_step_end(self, t):
            saves.append((t.run_dir / "last.pt").exists())
            if t.step == 3:
                raise KeyboardInterrupt

    opts = dict(data=str(small_sample), project=str(tmp_path), **FAST)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="zero", checkpoint_minutes=0, callbacks=[Stop()], **opts)
    assert saves == [False, False, False] and not (tmp_path / "zero").exists()  # nothing to resume: removed
    saves.clear()
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="tiny", checkpoint_minutes=1e-9, callbacks=[Stop()], **opts)
    assert saves == [False, True, True]
    assert torch.load(tmp_path / "tiny" / "last.pt", weights_only=True)["in_epoch"]["batch"] == 2


def test_resume_within_an_epoch_elsewhere_is_refused_in_one_line(small_sample, tmp_path):
    """The generators' states in a mid-epoch checkpoint are one per process, of one kind of
    device; resumed with more processes or on another device, the run stops with one line and
    the checkpoint is kept for a resume where it was written."""
    from imgclf.engine.callbacks import Callback

    class Stop(Callback):
        def on_step_end(self, t):
            if t.step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data=str(small_sample), project=str(tmp_path), name="cut", checkpoint_minutes=1e-9,
                     callbacks=[Stop()], **FAST)
    last = tmp_path / "cut" / "last.pt"
    with pytest.raises(UserError) as e:
        imgclf.train(resume=tmp_path / "cut", devices=2, progress=False)
    msg = str(e.value)
    assert "stopped within epoch 1, in 1 process on cpu" in msg and "--devices 1 --device cpu" in msg, msg
    assert "\n" not in msg
    assert make_config(tmp_path / "cut" / "config.yaml").devices == 1  # the refused resume changed nothing
    state = torch.load(last, weights_only=True)
    state["in_epoch"]["device"] = "cuda"  # as written by a run on a GPU
    torch.save(state, last)
    with pytest.raises(UserError, match="in 1 process on cuda.*--devices 1 --device cuda"):
        imgclf.train(resume=tmp_path / "cut", progress=False)
    state["in_epoch"]["device"] = "cpu"
    torch.save(state, last)
    res = imgclf.train(resume=tmp_path / "cut", progress=False)  # where it was written: it goes on
    assert [r["epoch"] for r in res.history] == [1]


def test_resume_says_when_the_data_changed(small_sample, tmp_path, capfd):
    from imgclf.engine.callbacks import Callback

    data = tmp_path / "data"
    shutil.copytree(small_sample / "train", data)

    class Crash(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 2:  # after epoch 1's checkpoint
                raise KeyboardInterrupt

    opts = {**FAST, "epochs": 3}
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data=str(data), project=str(tmp_path), name="cut", callbacks=[Crash()], **opts)
    capfd.readouterr()
    same = tmp_path / "same"
    shutil.copytree(tmp_path / "cut", same)
    imgclf.train(resume=same, progress=False)
    assert "data changed" not in capfd.readouterr().err
    (data / "cat" / sorted(os.listdir(data / "cat"))[0]).unlink()
    imgclf.train(resume=tmp_path / "cut", progress=False)
    assert "the data changed since this run started (train 360 -> 359 images, val 40 -> 40)" in capfd.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(small_sample, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "imgclf", "train", "--data", str(small_sample), "--project", str(tmp_path),
           "--name", "k", "--epochs", "3", "--batch-size", "32", "--no-progress", "--no-tensorboard",
           "--checkpoint-minutes", "0.0005"]  # a checkpoint within the epoch every 30 ms: killed mid-epoch
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "k" / "last.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "k" / "model.json").exists()  # it really died before finishing
    r = subprocess.run([sys.executable, "-m", "imgclf", "train", "--resume", str(tmp_path / "k"), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch" in r.stderr
    rows = (tmp_path / "k" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and (tmp_path / "k" / "model.json").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over_by_the_same_command_or_resume(small_sample, tmp_path,
                                                                                             capfd):
    # kill -9 while the data were decoded or the first epoch ran left a folder with config.yaml
    # and no checkpoint; the same command then said "already exists" and --resume said "nothing
    # to resume, use --exist-ok": two refusals before the user could start again
    opts = dict(data=str(small_sample), project=str(tmp_path), name="k", **FAST)
    kill = ("import os, signal, sys, imgclf\n"
            "from imgclf.engine.callbacks import Callback\n"
            "class Kill(Callback):\n"
            "    def on_train_start(self, t):\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"imgclf.train(callbacks=[Kill()], **{opts!r})\n")
    r = subprocess.run([sys.executable, "-c", kill], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = tmp_path / "k"
    assert (left / "config.yaml").is_file() and not (left / "last.pt").exists()
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(left, moved)
    # while another process trains in it (here: holds its lock), the folder is not taken over,
    # by the same command, --exist-ok or --resume; the lock goes with that process's death
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from imgclf.runs import hold_run; "
                               f"hold_run({str(left)!r}); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for kw in ({}, {"exist_ok": True}):
            with pytest.raises(UserError, match="is in use: another imgclf process is training in it"):
                imgclf.train(**opts, **kw)
        with pytest.raises(UserError, match="is in use"):
            imgclf.train(resume=left)
    finally:
        holder.kill()
        holder.wait()
    capfd.readouterr()
    res = imgclf.train(**opts)
    assert "holds a run that stopped before its first checkpoint: starting over in it" in capfd.readouterr().err
    assert res.run_dir == left and (left / "model.json").is_file() and len(res.history) == 1
    with pytest.raises(UserError, match="already exists"):  # a run with a checkpoint is never overwritten
        imgclf.train(**opts)
    res = imgclf.train(resume=moved, progress=False)  # its saved config, in the folder where it is now
    assert "stopped before its first checkpoint; starting it from the beginning" in capfd.readouterr().err
    assert res.run_dir == moved and (moved / "model.json").is_file() and len(res.history) == 1
    (moved / "last.pt").unlink()
    with pytest.raises(UserError, match="has a model but no last.pt"):
        imgclf.train(resume=moved)


def test_other_models_train(small_sample, tmp_path):
    for model, args in (("plaincnn", {"channels": [16, 32], "dense": [64]}), ("timm:resnet18", {})):
        res = imgclf.train(data=str(small_sample), project=str(tmp_path), model=model, model_args=args, **FAST)
        meta = json.loads((res.run_dir / "model.json").read_text())
        assert meta["architecture"] == model
        clf = imgclf.load(res.run_dir)
        out = clf.predict(sorted((small_sample / "test" / "cat").glob("*.jpg"))[:2], top_k=3)
        assert len(out) == 2 and len(out[0]["top"]) == 3


def test_timm_small_input_keeps_resolution():
    from imgclf.models.registry import build_model

    m = build_model("timm:resnet18", 10, 32, {"small_stem": True})
    feats = m.forward_features(torch.zeros(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 / 8 instead of 32 / 32


def test_unknown_model_is_user_error(capsys, small_sample):
    assert main(["train", "--data", str(small_sample), "--model", "resnet_nonexistent"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("name, meant", [("resnt50", "resnet50"), ("timm:resnet-50", "timm:resnet50"),
                                         ("fastnt", "fastnet")])
def test_model_name_typos_get_close_names(name, meant):
    from imgclf.models.registry import resolve_name

    with pytest.raises(UserError) as e:
        resolve_name(name)
    assert "did you mean" in str(e.value) and meant in str(e.value).split("did you mean")[1]


def test_timm_rejecting_model_arguments_is_user_error():
    from imgclf.models.registry import build_model

    # timm asserts on the pooling type: an AssertionError from create_model was a traceback
    with pytest.raises(UserError, match="timm:resnet18: bad model arguments .*global_pool"):
        build_model("timm:resnet18", 10, 32, {"global_pool": "bogus"})


# --- evaluate and predict ----------------------------------------------------------------------------


def test_evaluate_cli_writes_figures(tiny_run, sample_dir, capsys, tmp_path):
    assert main(["evaluate", str(tiny_run), "--data", str(sample_dir), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "airplane" in out
    for f in ("confusion.png", "confusion.csv", "per_class.csv", "metrics.json"):
        assert (tmp_path / "ev" / f).exists()
    cm = np.loadtxt(tmp_path / "ev" / "confusion.csv", delimiter=",", skiprows=1, usecols=range(1, 11))
    assert cm.sum() == 1000 and (cm.sum(1) == 100).all()


def test_predict_cli_table_and_csv(tiny_run, sample_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted((sample_dir / "test" / "ship").glob("*.jpg"))[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "preds.csv"
    code = main(["predict", str(tiny_run), str(folder), "--top-k", "5", "--output", str(out)])
    assert code == 1  # one input could not be read
    text = capsys.readouterr().out
    assert "broken.jpg\tERROR" in text
    lines = out.read_text().splitlines()
    assert lines[0].startswith("input,error,class1,prob1") and len(lines) == 5
    row = lines[1].split(",")
    probs = [float(row[i]) for i in range(3, 13, 2)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_python_api_predict_matches_cli_preprocessing(tiny_run, sample_dir):
    clf = imgclf.load(tiny_run)
    path = sorted((sample_dir / "test" / "frog").glob("*.jpg"))[0]
    a = clf.predict([path])[0]["top"]
    arr = np.asarray(Image.open(path).convert("RGB"))
    b = clf.predict([arr])[0]["top"]
    assert a[0][0] == b[0][0] and abs(a[0][1] - b[0][1]) < 1e-4


def _write_planar_csv(sample_dir: Path, path: Path, per_class: int = 20) -> None:
    rows = []
    for cdir in sorted((sample_dir / "train").iterdir()):
        for f in sorted(cdir.glob("*.jpg"))[:per_class]:
            px = np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1)  # R..G..B..
            rows.append(cdir.name + "," + ",".join(map(str, px.tolist())))
    header = "label," + ",".join(f"p{i}" for i in range(3072))
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def test_pixel_csv_trains_with_explicit_layout(sample_dir, tmp_path, capsys):
    csv_path = tmp_path / "pixels.csv"
    _write_planar_csv(sample_dir, csv_path)
    assert main(["train", "--data", str(csv_path), "--project", str(tmp_path)]) == 2
    assert "--csv-layout" in capsys.readouterr().err  # refuses to guess the channel order
    res = imgclf.train(data=str(csv_path), csv_layout="planar", project=str(tmp_path), **FAST)
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert meta["classes"][:2] == ["airplane", "automobile"] and meta["image_size"] == 32
    # the decoded CSV pixels equal the JPEG pixels: the layout was applied correctly
    from imgclf.data.arrays import read_pixel_csv

    ds = read_pixel_csv(csv_path, layout="planar")
    first = sorted((sample_dir / "train" / "airplane").glob("*.jpg"))[0]
    assert np.array_equal(ds.train.images[0], np.asarray(Image.open(first).convert("RGB")))


def test_non_square_pixel_csv_trains_with_csv_shape(sample_dir, tmp_path):
    # grey 24x40 images (a pandas export with its index column): --csv-shape reaches training
    rows = []
    for cdir in sorted((sample_dir / "train").iterdir())[:3]:
        for f in sorted(cdir.glob("*.jpg"))[:20]:
            px = np.asarray(Image.open(f).convert("L").resize((40, 24))).reshape(-1)
            rows.append(f"{len(rows)},{cdir.name}," + ",".join(map(str, px.tolist())))
    csv_path = tmp_path / "grey.csv"
    csv_path.write_text(",label," + ",".join(f"p{i}" for i in range(960)) + "\n" + "\n".join(rows) + "\n")
    args = ["train", "--data", str(csv_path), "--project", str(tmp_path), "--name", "grey", "--epochs", "1",
            "--no-progress", "--no-tensorboard"]
    assert main(args) == 2  # 960 columns: neither a square grey nor a square RGB image
    assert main([*args, "--csv-shape", "24x40", "--exist-ok"]) == 0
    meta = json.loads((tmp_path / "grey" / "model.json").read_text())
    assert meta["classes"] == sorted(d.name for d in (sample_dir / "train").iterdir())[:3]
    assert make_config(tmp_path / "grey" / "config.yaml").csv_shape == "24x40"


def test_tensorboard_events_written(small_sample, tmp_path):
    res = imgclf.train(data=str(small_sample), project=str(tmp_path), epochs=1, progress=False, batch_size=64)
    assert list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_tensorboard_keeps_every_epoch_across_a_resume(small_sample, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from imgclf.engine.callbacks import Callback

    class Crash(Callback):
        def on_epoch_end(self, t, row):
            if row["epoch"] == 3:
                raise KeyboardInterrupt

    opts = dict(data=str(small_sample), project=str(tmp_path), epochs=4, progress=False, batch_size=64)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(name="cut", callbacks=[Crash()], **opts)
    imgclf.train(resume=tmp_path / "cut", progress=False)
    ea = EventAccumulator(str(tmp_path / "cut" / "tensorboard"))
    ea.Reload()
    # the killed run's epoch 3 may or may not have reached the file: either way each epoch once
    assert [e.step for e in ea.Scalars("loss/train")] == [1, 2, 3, 4]


def test_missing_optional_package_is_one_line(tiny_run, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["export", str(tiny_run), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[deploy]'" in err[0]


@pytest.mark.parametrize("missing, hint", [("optuna", "pip install -e '.[tune]'"),
                                           ("psycopg2", "pip install psycopg2-binary")])
def test_a_missing_optional_package_names_what_installs_it(monkeypatch, capsys, missing, hint):
    from imgclf import cli

    def needs(args):
        raise ModuleNotFoundError(f"No module named '{missing}'", name=missing)

    monkeypatch.setattr(cli, "cmd_train", needs)
    assert cli.main(["train", "--data", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(hint) and len(err.splitlines()) == 1


def test_a_full_disk_while_saving_checkpoints_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno
    from types import SimpleNamespace

    import safetensors.torch
    from safetensors import SafetensorError

    from imgclf.engine import trainer as tr

    last = tmp_path / "last.pt"
    tr.atomic_save({"epoch": 1}, last)
    good = last.read_bytes()

    def full_after_a_bit(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_after_a_bit)
    with pytest.raises(UserError) as ei:
        tr.atomic_save({"epoch": 2}, last)
    assert str(ei.value) == f"no space left on device writing {last}: free some space; last.pt keeps the last good epoch"
    assert last.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    # the space runs out when the buffered bytes reach the disk, or on a quota: the same line
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(UserError, match="^no space left on device writing .*last.pt: free some space"):
        tr.atomic_save({"epoch": 2}, last)
    assert last.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    # any other error is not dressed up as a full disk
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        tr.atomic_save({"epoch": 2}, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()

    def safetensors_full(state, filename, *a, **k):
        open(filename, "wb").write(b"partial")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full)
    fake = SimpleNamespace(cfg=SimpleNamespace(monitor="val_loss", min_delta=0.0), best=None, best_epoch=0,
                           run_dir=tmp_path, is_main=True, history=[], eval_model=lambda: torch.nn.Linear(2, 2))
    with pytest.raises(UserError) as ei:
        tr.Trainer._track_best(fake, {"val_loss": 0.5, "epoch": 3})
    best = tmp_path / "best.safetensors"
    assert str(ei.value) == f"no space left on device writing {best}: free some space; last.pt keeps the last good epoch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_the_default_net_on_few_images_points_to_a_pretrained_backbone_once(small_sample, tmp_path, capfd):
    from imgclf import api, log

    log.reset()
    imgclf.train(data=str(small_sample), project=str(tmp_path), epochs=1, progress=False, tensorboard=False,
                 final_eval=False)
    hint = [ln for ln in capfd.readouterr().err.splitlines() if "pretrained backbone" in ln]
    assert len(hint) == 1 and hint[0].startswith("imgclf: 360 training images, and the default net learns from scratch")
    assert "--model efficientnet_lite0 --pretrained" in hint[0]
    api._hint_pretrained(360)  # a sweep's next trial: said once per process
    api._hint_pretrained(api.FEW_IMAGES)  # enough images for the default to hold its own
    assert "pretrained" not in capfd.readouterr().err
    log.reset()
    imgclf.train(data=str(small_sample), project=str(tmp_path), epochs=1, model="fastnet", progress=False,
                 tensorboard=False, final_eval=False)
    assert "pretrained backbone" not in capfd.readouterr().err  # a model the user chose is left alone
