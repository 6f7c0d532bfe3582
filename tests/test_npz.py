"""Arrays as training data: ``imgclf.train(data=(x, y))`` and ``--data file.npz``, in the layouts
Keras, torchvision and Kaggle hand them over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.data.arrays import DataError
from imgclf.data.npz import build_source, images_nhwc, read_npz

FAST = dict(epochs=1, progress=False, tensorboard=False)


def _arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(p.name for p in (root / split).iterdir())
    xs, ys = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / split / c).glob("*.jpg")):
            xs.append(np.asarray(Image.open(f).convert("RGB")))
            ys.append(i)
    return np.stack(xs), np.asarray(ys, np.uint8), classes


@pytest.fixture(scope="module")
def cifar(small_sample):
    xtr, ytr, classes = _arrays(small_sample, "train")
    xte, yte, _ = _arrays(small_sample, "test")
    return xtr, ytr, xte, yte, classes


def test_every_layout_reads_as_the_same_rgb_images(cifar):
    x = cifar[0][:8]
    assert images_nhwc(x, "x") is not None and np.array_equal(images_nhwc(x, "x"), x)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255  # torchvision's ToTensor: N x C x H x W, 0..1
    assert np.array_equal(images_nhwc(t, "x"), x)
    assert np.array_equal(images_nhwc(x.astype(np.float32) / 127.5 - 1, "x"), x)  # Keras 'tf' mode, -1..1
    assert np.array_equal(images_nhwc(x.astype(np.uint16) * 257, "x"), x)  # 16-bit
    grey = images_nhwc(x[..., 0], "x")  # MNIST: N x H x W
    assert grey.shape == (8, 32, 32, 3) and np.array_equal(grey[..., 2], x[..., 0])
    rgba = np.concatenate([x, np.zeros_like(x[..., :1])], axis=3)  # fully transparent: white, as files are
    assert (images_nhwc(rgba, "x") == 255).all()
    z = (x - x.mean()) / x.std()  # mean/std-normalised: its statistics are unknown, so refused
    with pytest.raises(DataError, match=r"^x: float image values span .*undo any mean/std normalisation"):
        images_nhwc(z.astype(np.float32), "x")
    with pytest.raises(DataError, match="no channel axis"):
        images_nhwc(np.zeros((4, 8, 8, 5), np.uint8), "x")


def test_labels_by_index_column_one_hot_multi_hot_and_name(cifar):
    x, y = cifar[0][::10], cifar[1][::10]  # 40 images, 4 of each class
    keras = build_source({"train": (x, y[:, None])}, None, "k", "k")  # cifar10.load_data(): N x 1
    assert keras.task == "single" and np.array_equal(keras.train.labels, y) and keras.classes[0] == "0"
    onehot = build_source({"train": (x, np.eye(10)[y])}, None, "k", "k")  # to_categorical
    assert onehot.task == "single" and np.array_equal(onehot.train.labels, y)
    multi = np.eye(10)[y]
    multi[:, 9] = 1  # a second label on every image
    ml = build_source({"train": (x, multi)}, None, "k", "k")
    assert ml.task == "multilabel" and ml.train.labels.shape == (40, 10)
    names = np.array(["dog" if v % 2 else "cat" for v in y])
    named = build_source({"train": (x, names)}, None, "k", "k")
    assert named.classes == ["cat", "dog"] and np.array_equal(named.train.labels, y % 2)
    for bad, msg in (((x, y[:39]), "39 labels"), ((x, y - 5.0), "negative label"),
                     ((x, y + 0.5), "not whole numbers"), ((x, np.zeros(40)), "one class only")):
        with pytest.raises(DataError, match=msg):
            build_source({"train": bad}, None, "k", "k")


def test_train_on_keras_arrays_records_a_file_that_resume_and_evaluate_read(cifar, tmp_path):
    xtr, ytr, xte, yte, _ = cifar
    res = imgclf.train(data=((xtr, ytr[:, None]), (xte, yte[:, None])), project=str(tmp_path), **FAST)
    assert res.run_dir.name == "arrays-fastnet-1" and res.test["n"] == 100
    recorded = Path(yaml.safe_load((res.run_dir / "config.yaml").read_text())["data"])
    assert recorded.suffix == ".npz" and recorded.is_file()
    with np.load(recorded) as z:
        assert np.array_equal(z["x_test"], xte) and sorted(z.files) == ["x_test", "x_train", "y_test", "y_train"]
    # the same arrays again: the same file, not a second copy (the session's cache holds other
    # tests' arrays too)
    saved = set(recorded.parent.glob("*.npz"))
    again = imgclf.train(data=((xtr, ytr[:, None]), (xte, yte[:, None])), project=str(tmp_path), **FAST)
    assert yaml.safe_load((again.run_dir / "config.yaml").read_text())["data"] == str(recorded)
    assert set(recorded.parent.glob("*.npz")) == saved
    m = imgclf.evaluate(res.run_dir, data=(xte, yte), progress=False)  # labels in the model's class order
    assert m["top1"] == pytest.approx(res.test["top1"]) and m["n"] == 100


def test_cli_trains_on_an_npz_like_keras_mnist(cifar, tmp_path, capsys):
    xtr, ytr, xte, yte, classes = cifar
    npz = tmp_path / "mnist.npz"  # keras' mnist.npz: grey N x H x W, labels by index; class names added
    np.savez(npz, x_train=xtr[..., 1], y_train=ytr, x_test=xte[..., 1], y_test=yte, classes=np.array(classes))
    assert main(["train", "--data", str(npz), "--epochs", "1", "--project", str(tmp_path / "runs"),
                 "--no-progress", "--no-tensorboard"]) == 0
    run = tmp_path / "runs" / "mnist-fastnet-1"
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == classes and meta["image_size"] == 32
    assert "test: n=100" in capsys.readouterr().out


def test_bad_npz_files_are_one_line(tmp_path):
    odd = tmp_path / "odd.npz"
    np.savez(odd, features=np.zeros((3, 4)))
    with pytest.raises(DataError, match=r"no training arrays; expected x_train and y_train .*found features"):
        read_npz(odd)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="arrays of Python objects are not read"):
        read_npz(pickled)
    with pytest.raises(DataError, match=r"data: pass a path, \(images, labels\)"):
        imgclf.train(data=(1, 2, 3, 4), project=str(tmp_path), **FAST)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the resident set is read from Linux's /proc")
def test_an_npz_saved_uncompressed_is_read_from_the_file_not_copied_into_ram(tmp_path):
    import subprocess
    import sys

    # 128 MB of uint8 images at their size: np.load read all of it into RAM, on top of the
    # notebook's own copy; mapped, nothing is read until the loader pages it in
    x = np.random.default_rng(0).integers(0, 256, (8192, 64, 64, 4), dtype=np.uint8)[..., :3]
    np.savez(tmp_path / "big.npz", x_train=x, y_train=np.arange(len(x)) % 7)
    code = (
        "import sys\nfrom pathlib import Path\nfrom imgclf.data.npz import read_npz\n"
        "def rss():\n"
        "    return next(int(ln.split()[1]) for ln in open('/proc/self/status') if ln.startswith('VmRSS'))\n"
        "before = rss()\n"
        "src = read_npz(Path(sys.argv[1]))\n"
        "grew = rss() - before\n"
        "print(grew // 1024, src.train.images.shape, int(src.train.images[4000].sum()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.npz")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    grew_mb, shape, checksum = r.stdout.split(" ", 1)[0], r.stdout.split(" ", 1)[1].rsplit(" ", 1)[0], \
        r.stdout.split()[-1]
    assert int(grew_mb) < 40, r.stdout  # was ~130 MB
    assert shape == "(8192, 64, 64, 3)" and int(checksum) == int(x[4000].sum())
    # compressed members, Fortran order and grey images: read whole, converted as before
    np.savez_compressed(tmp_path / "small.npz", x_train=x[:20], y_train=np.arange(20) % 7)
    np.savez(tmp_path / "fortran.npz", x_train=np.asfortranarray(x[:20, ..., 0]), y_train=np.arange(20) % 7)
    assert np.array_equal(read_npz(tmp_path / "small.npz").train.images, x[:20])
    assert np.array_equal(read_npz(tmp_path / "fortran.npz").train.images, np.repeat(x[:20, ..., :1], 3, axis=3))


def test_float_and_16bit_image_arrays_convert_without_a_wide_copy_of_the_whole_array():
    # float32 images in 0..1 went through a float64 copy of the whole array and another for the
    # rounding: 4x the array's size at once, which a notebook's 12 GB array of 224-px images
    # could not have; now slices go through, so the uint8 result (a quarter of the input) plus
    # a few MB is all it takes
    import tracemalloc

    from imgclf.data.npz import images_nhwc

    x = np.random.default_rng(0).random((6000, 32, 32, 3), dtype=np.float32)  # 70 MB
    for a, want in ((x, np.round(x.astype(np.float64) * 255)), (x * 2 - 1, np.round(x.astype(np.float64) * 255)),
                    ((x * 4095).astype(np.uint16), None)):
        tracemalloc.start()
        try:
            out = images_nhwc(a, "x_train")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < out.nbytes + (40 << 20), (a.dtype, peak >> 20)
        if want is not None:
            assert np.abs(out.astype(int) - want).max() <= 1


def test_scikit_learn_capital_x_keys_are_read(cifar, tmp_path):
    """np.savez(f, X_train=..., y_train=..., X_test=..., y_test=...): scikit-learn's habit (a capital
    X for a matrix) was 'no training arrays; expected x_train and y_train'."""
    xtr, ytr, xte, yte, classes = cifar
    f = tmp_path / "sk.npz"
    np.savez(f, X_train=xtr, y_train=ytr, X_test=xte, y_test=yte, Classes=np.asarray(classes))
    src = read_npz(f)
    assert src.classes == classes and len(src.train) == len(xtr) and len(src.test) == len(xte)
    assert np.array_equal(src.train.images, xtr) and np.array_equal(src.test.labels, yte)
    every = slice(None, None, len(xtr) // 10)  # across the classes
    np.savez(tmp_path / "xy.npz", X=xtr[every], Y=ytr[every])
    assert len(read_npz(tmp_path / "xy.npz").train) == len(xtr[every])
