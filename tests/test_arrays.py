"""Array-backed sources: CIFAR python-version pickles (restricted unpickling, download/extract)
and pixel CSVs. Fixtures are built in tmp_path from real CIFAR-10 JPEGs."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import arrays
from imgclf.data.arrays import (
    ArrayDataset,
    DataError,
    download_cifar,
    is_cifar_dir,
    read_cifar,
    read_pixel_csv,
)
from imgclf.data.sources import load_source
from imgclf.errors import UserError

DATA = Path(os.environ.get("IMGCLF_TEST_DATA", "/nonexistent"))  # set by conftest.py
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

pytestmark = pytest.mark.skipif(not (DATA / "train" / "cat").is_dir(), reason=f"no CIFAR JPEGs in {DATA}")


# ---------------------------------------------------------------------------------------------
# fixtures


def _load_jpegs(split: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = [], []
    for k, c in enumerate(CLASSES):
        for f in sorted((DATA / split / c).glob("*.jpg"))[:per_class]:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert("RGB")))
            labels.append(k)
    order = np.random.default_rng(seed).permutation(len(labels))  # interleave classes like CIFAR
    return np.stack(imgs)[order], np.array(labels, dtype=np.int64)[order]


@pytest.fixture(scope="module")
def real():
    train_x, train_y = _load_jpegs("train", 10, 0)  # 100 images
    test_x, test_y = _load_jpegs("test", 2, 1)  # 20 images
    assert train_x.shape == (100, 32, 32, 3) and train_x.dtype == np.uint8
    return train_x, train_y, test_x, test_y


def planar_rows(imgs: np.ndarray) -> np.ndarray:
    """CIFAR row format written out explicitly: 1024 R bytes, 1024 G bytes, 1024 B bytes."""
    n = len(imgs)
    return np.concatenate([imgs[..., ch].reshape(n, -1) for ch in range(3)], axis=1)


def _dump(obj, file: Path, legacy_numpy_name: bool = False) -> None:
    data = pickle.dumps(obj, protocol=2)  # the real files are Python-2 protocol-2 pickles
    if legacy_numpy_name:  # what numpy 1.x / Python 2 write
        data = data.replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")
    file.write_bytes(data)


def write_cifar10(folder: Path, train_x, train_y, test_x, test_y) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        _dump(
            {
                b"batch_label": f"training batch {i} of 5".encode(),
                b"labels": [int(v) for v in train_y[idx]],
                b"data": planar_rows(train_x[idx]),
                b"filenames": [f"img_{j}.png".encode() for j in idx],
            },
            folder / f"data_batch_{i}",
            legacy_numpy_name=(i % 2 == 1),
        )
    _dump(
        {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test_y],
         b"data": planar_rows(test_x), b"filenames": [b"t.png"] * len(test_y)},
        folder / "test_batch",
    )
    _dump({b"num_cases_per_batch": 20, b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072},
          folder / "batches.meta")
    return folder


FINE = [f"fine_{i:02d}" for i in range(100)]
COARSE = [f"coarse_{i:02d}" for i in range(20)]


def _fine_coarse(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fine = (y * 7 + 3) % 100
    return fine, fine % 20


def write_cifar100(folder: Path, train_x, train_y, test_x, test_y) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        fine, coarse = _fine_coarse(y)
        _dump({b"filenames": [b"f.png"] * len(y), b"batch_label": name.encode(),
               b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist(), b"data": planar_rows(x)},
              folder / name)
    _dump({b"fine_label_names": [c.encode() for c in FINE], b"coarse_label_names": [c.encode() for c in COARSE]},
          folder / "meta")
    return folder


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def test_data_error_is_a_user_error():
    assert issubclass(DataError, UserError)


def test_read_cifar10_exact_pixels_labels_classes(tmp_path, real):
    train_x, train_y, test_x, test_y = real
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", *real)
    assert is_cifar_dir(folder) and is_cifar_dir(tmp_path)  # the folder, or the one containing it
    assert not is_cifar_dir(tmp_path / "nope") and not is_cifar_dir(folder / "batches.meta")

    for where in (folder, tmp_path):
        ds = read_cifar(where)
        assert isinstance(ds, ArrayDataset)
        assert ds.classes == CLASSES
        for split, x, y in ((ds.train, train_x, train_y), (ds.test, test_x, test_y)):
            assert split.images.dtype == np.uint8 and split.images.flags["C_CONTIGUOUS"]
            assert split.images.shape == x.shape
            assert split.labels.dtype == np.int64
            np.testing.assert_array_equal(split.images, x)  # identical to the decoded JPEGs
            np.testing.assert_array_equal(split.labels, y)

    # The classic bug, reshaping planar rows straight to HxWx3, would not reproduce the images.
    naive = planar_rows(train_x).reshape(-1, 32, 32, 3)
    assert not np.array_equal(naive, train_x)


def test_read_cifar100_fine_and_coarse(tmp_path, real):
    train_x, train_y, test_x, test_y = real
    folder = write_cifar100(tmp_path / "cifar-100-python", *real)
    assert is_cifar_dir(folder) and is_cifar_dir(tmp_path)
    fine = read_cifar(folder)
    coarse = read_cifar(tmp_path, label="coarse")
    assert fine.classes == FINE and coarse.classes == COARSE
    for ds, which in ((fine, 0), (coarse, 1)):
        np.testing.assert_array_equal(ds.train.images, train_x)
        np.testing.assert_array_equal(ds.test.images, test_x)
        np.testing.assert_array_equal(ds.train.labels, _fine_coarse(train_y)[which])
        np.testing.assert_array_equal(ds.test.labels, _fine_coarse(test_y)[which])
        assert ds.train.images.flags["C_CONTIGUOUS"] and ds.train.labels.dtype == np.int64


def _py2_string(b: bytes) -> bytes:
    # SHORT_BINSTRING / BINSTRING: how Python 2 pickles a str (read back as bytes with encoding='bytes')
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b


def _py2_batch_pickle(labels: list[int], data: np.ndarray) -> bytes:
    """A CIFAR batch byte-for-byte the way Python 2 + numpy 1.x wrote the official files."""
    n, d = data.shape
    s = _py2_string
    return (
        b"\x80\x02}(" + s(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
        + s(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R("
        + b"K\x01M" + n.to_bytes(2, "little") + b"M" + d.to_bytes(2, "little") + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + b"\x89\x88\x87R(K\x03" + s(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + s(data.tobytes()) + b"tbu."
    )


def test_python2_written_batch(tmp_path, real):
    train_x, train_y, test_x, test_y = real
    folder = write_cifar10(tmp_path / "c10", *real)
    (folder / "test_batch").write_bytes(_py2_batch_pickle([int(v) for v in test_y], planar_rows(test_x)))
    ds = read_cifar(folder)
    np.testing.assert_array_equal(ds.test.images, test_x)
    np.testing.assert_array_equal(ds.test.labels, test_y)


def test_cifar10_has_no_coarse_labels(tmp_path, real):
    folder = write_cifar10(tmp_path / "c10", *real)
    with pytest.raises(DataError, match="no coarse labels"):
        read_cifar(folder, label="coarse")


def test_incomplete_and_wrong_folders(tmp_path, real):
    folder = write_cifar10(tmp_path / "c10", *real)
    (folder / "data_batch_3").unlink()
    assert not is_cifar_dir(folder)
    with pytest.raises(DataError, match="incomplete CIFAR-10 folder: missing data_batch_3"):
        read_cifar(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a CIFAR python-version folder"):
        read_cifar(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        read_cifar(tmp_path / "missing")


def test_corrupt_pickle_is_a_data_error(tmp_path, real):
    folder = write_cifar10(tmp_path / "c10", *real)
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read .*test_batch: it is not a valid CIFAR"):
        read_cifar(folder)


class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload, global_name", [(_SystemCall, "system"), (_Eval, "builtins.eval")])
def test_malicious_pickle_is_refused_without_running(tmp_path, real, payload, global_name):
    folder = write_cifar10(tmp_path / "c10", *real)
    marker = tmp_path / "pwned"
    evil = {b"labels": [0], b"data": payload(marker)}
    blob = pickle.dumps(evil, protocol=2)
    assert global_name.split(".")[-1].encode() in blob  # the payload really is in the file
    (folder / "data_batch_2").write_bytes(blob)
    with pytest.raises(DataError, match=rf"refusing to load .*data_batch_2: it contains \S*{global_name}, "
                                        "which a CIFAR file never does"):
        read_cifar(folder)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# download_cifar


def _tar_gz(src_dir: Path, arcname: str, dest: Path) -> str:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src_dir, arcname=arcname)
    return hashlib.md5(dest.read_bytes()).hexdigest()


def _patch_source(monkeypatch, **changes):
    src = dataclasses.replace(arrays.CIFAR_SOURCES["cifar10"], **changes)
    monkeypatch.setitem(arrays.CIFAR_SOURCES, "cifar10", src)
    return src


UNREACHABLE = "http://127.0.0.1:9/cifar-10-python.tar.gz"


def test_download_file_url_extract_and_reuse(tmp_path, real, monkeypatch):
    train_x, train_y, test_x, test_y = real
    made = write_cifar10(tmp_path / "made" / "cifar-10-batches-py", *real)
    tgz = tmp_path / "served" / "cifar-10-python.tar.gz"
    tgz.parent.mkdir()
    md5 = _tar_gz(made, "cifar-10-batches-py", tgz)
    _patch_source(monkeypatch, url=tgz.as_uri(), md5=md5)

    root = tmp_path / "cache" / "datasets"
    out = download_cifar("cifar10", root)
    assert out == root / "cifar-10-batches-py"
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert not list(root.glob("*.part")) and not list(root.glob(".extract-*"))
    ds = read_cifar(out)
    np.testing.assert_array_equal(ds.train.images, train_x)
    np.testing.assert_array_equal(ds.test.labels, test_y)
    assert ds.classes == CLASSES

    # Reuse: the extracted folder, then the archive, without touching the network.
    _patch_source(monkeypatch, url=UNREACHABLE, md5=md5)
    assert download_cifar("cifar-10", root) == out
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    assert download_cifar("cifar10", root) == out
    np.testing.assert_array_equal(read_cifar(root).train.labels, train_y)


def test_download_offline_names_the_file_to_place(tmp_path, monkeypatch):
    _patch_source(monkeypatch, url=UNREACHABLE)
    root = tmp_path / "datasets"
    with pytest.raises(DataError) as ei:
        download_cifar("cifar10", root)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "could not download http://127.0.0.1:9/" in msg
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/" in msg and str(root) in msg
    assert not list(root.glob("*.part"))


def test_download_md5_mismatch(tmp_path, real, monkeypatch):
    made = write_cifar10(tmp_path / "made" / "cifar-10-batches-py", *real)
    tgz = tmp_path / "x.tar.gz"
    _tar_gz(made, "cifar-10-batches-py", tgz)
    _patch_source(monkeypatch, url=tgz.as_uri(), md5="0" * 32)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="md5"):
        download_cifar("cifar10", root)
    assert not (root / "cifar-10-python.tar.gz").exists() and not list(root.glob("*.part"))
    # a placed archive that is not the official file is reported, not silently used
    (root / "cifar-10-python.tar.gz").write_bytes(tgz.read_bytes())
    with pytest.raises(DataError, match="not the official"):
        download_cifar("cifar10", root)


def _evil_tar(dest: Path, evil: tarfile.TarInfo, payload: bytes = b"pwned") -> str:
    with tarfile.open(dest, "w:gz") as tf:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"hi"))
        if evil.isreg():
            evil.size = len(payload)
            tf.addfile(evil, io.BytesIO(payload))
        else:
            tf.addfile(evil)
    return hashlib.md5(dest.read_bytes()).hexdigest()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti


@pytest.mark.parametrize(
    "member, match",
    [
        (tarfile.TarInfo("../evil"), "outside"),
        (tarfile.TarInfo("cifar-10-batches-py/../../evil"), "outside"),
        (tarfile.TarInfo("/tmp/imgclf-test-evil-abs"), "outside"),
        (_symlink("cifar-10-batches-py/link", "../../evil"), "link or special file"),
    ],
)
def test_tar_escaping_root_is_refused(tmp_path, monkeypatch, member, match):
    root = tmp_path / "a" / "root"
    root.mkdir(parents=True)
    md5 = _evil_tar(root / "cifar-10-python.tar.gz", member)
    _patch_source(monkeypatch, url=UNREACHABLE, md5=md5)
    with pytest.raises(DataError, match=f"refusing to extract .*{match}"):
        download_cifar("cifar10", root)
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/imgclf-test-evil-abs").exists()
    assert not (root / "cifar-10-batches-py").exists() and not list(root.glob(".extract-*"))


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match="cifar10 or cifar100"):
        download_cifar("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------
# pixel CSVs


def write_csv(path: Path, labels, rows: np.ndarray, *, header=None, label_last=False, fmt=str) -> Path:
    n_pix = rows.shape[1]
    pix_names = [f"pixel{i}" for i in range(n_pix)]
    if header is None:
        header = pix_names + ["label"] if label_last else ["label"] + pix_names
    with open(path, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        for lab, row in zip(labels, rows, strict=True):
            cells = [fmt(v) for v in row.tolist()]
            cells = cells + [str(lab)] if label_last else [str(lab)] + cells
            f.write(",".join(cells) + "\n")
    return path


def test_csv_planar_and_interleaved_round_trip(tmp_path, real):
    train_x, train_y = real[0], real[1]
    planar = write_csv(tmp_path / "planar.csv", train_y, planar_rows(train_x))
    inter = write_csv(tmp_path / "inter.csv", train_y, train_x.reshape(len(train_x), -1))
    for path, layout in ((planar, "planar"), (inter, "interleaved")):
        ds = read_pixel_csv(path, layout=layout)
        assert ds.test is None
        assert ds.classes == [str(i) for i in range(10)]
        assert ds.train.images.dtype == np.uint8 and ds.train.images.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(ds.train.images, train_x)
        np.testing.assert_array_equal(ds.train.labels, train_y)
        assert ds.train.labels.dtype == np.int64


def test_csv_auto_refuses_to_guess_rgb_layout(tmp_path, real):
    path = write_csv(tmp_path / "rgb.csv", real[1], planar_rows(real[0]))
    with pytest.raises(DataError, match=r"3x32x32 pixel columns.*--csv-layout planar\|interleaved"):
        read_pixel_csv(path)


def test_csv_planar_read_as_interleaved_is_scrambled(tmp_path, real):
    """Documents why 'auto' will not guess: the wrong layout reads fine but scrambles every image."""
    train_x, train_y = real[0], real[1]
    path = write_csv(tmp_path / "planar.csv", train_y, planar_rows(train_x))
    wrong = read_pixel_csv(path, layout="interleaved").train.images
    assert wrong.shape == train_x.shape
    assert not np.array_equal(wrong, train_x)
    np.testing.assert_array_equal(wrong, planar_rows(train_x).reshape(-1, 32, 32, 3))


def test_csv_gray_mnist_like_replicates_channels(tmp_path, real):
    gray = np.stack([np.asarray(Image.fromarray(x).convert("L").resize((28, 28), Image.BILINEAR))
                     for x in real[0]])
    path = write_csv(tmp_path / "mnist.csv", real[1], gray.reshape(len(gray), -1))
    ds = read_pixel_csv(path)  # 784 columns: auto -> gray 28x28
    assert ds.train.images.shape == (100, 28, 28, 3) and ds.train.images.flags["C_CONTIGUOUS"]
    for ch in range(3):
        np.testing.assert_array_equal(ds.train.images[..., ch], gray)
    np.testing.assert_array_equal(read_pixel_csv(path, layout="gray").train.images, ds.train.images)


def test_csv_float_pixels_are_scaled(tmp_path, real):
    train_x, train_y = real[0], real[1]
    path = write_csv(tmp_path / "float.csv", train_y, train_x.reshape(100, -1) / 255.0, fmt=repr)
    ds = read_pixel_csv(path, layout="interleaved")
    np.testing.assert_array_equal(ds.train.images, train_x)


def test_csv_float_detection_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "_CSV_CHUNK_VALUES", 17)  # one row per chunk
    rows = np.array([[0, 1, 1, 0] * 4, [0.5] * 16, [1.0] * 16])
    path = write_csv(tmp_path / "f.csv", [0, 1, 0], rows, fmt=repr)
    img = read_pixel_csv(path).train.images[..., 0].reshape(3, -1)  # first row: 0/1 -> 0/255
    np.testing.assert_array_equal(img, [[0, 255, 255, 0] * 4, [128] * 16, [255] * 16])
    rows = np.array([[0, 200] * 8, [0.5] * 16])
    bad = write_csv(tmp_path / "mixed.csv", [0, 1], rows, fmt=repr)
    with pytest.raises(DataError, match="line 3, column 2 .*earlier rows hold integer pixels above 1"):
        read_pixel_csv(bad)


def test_csv_string_labels(tmp_path, real):
    train_x, train_y = real[0], real[1]
    names = [CLASSES[i] for i in train_y]
    path = write_csv(tmp_path / "named.csv", names, train_x.reshape(100, -1))
    ds = read_pixel_csv(path, layout="interleaved")
    assert ds.classes == sorted(CLASSES)
    assert [ds.classes[i] for i in ds.train.labels] == names
    given = read_pixel_csv(path, layout="interleaved", classes=CLASSES)
    assert given.classes == CLASSES
    np.testing.assert_array_equal(given.train.labels, train_y)
    with pytest.raises(DataError, match="not among the 3 known classes: 'airplane'"):
        read_pixel_csv(path, layout="interleaved", classes=["bird", "cat", "dog"])


def test_csv_label_column_by_index_last_and_case(tmp_path, real):
    train_x, train_y = real[0], real[1]
    path = write_csv(tmp_path / "last.csv", train_y, train_x.reshape(100, -1), label_last=True)
    for col in ("label", "LABEL", -1, 3072, "3072"):
        ds = read_pixel_csv(path, label_column=col, layout="interleaved")
        np.testing.assert_array_equal(ds.train.images, train_x)
        np.testing.assert_array_equal(ds.train.labels, train_y)
    # a quoted label in the middle of the row
    hdr = ["a", "y", "b", "c", "d"]
    p2 = tmp_path / "mid.csv"
    p2.write_text(",".join(hdr) + '\n1,"cat",2,3,4\n5,dog,6,7,8\n')
    ds = read_pixel_csv(p2, label_column="y")
    assert ds.classes == ["cat", "dog"]
    np.testing.assert_array_equal(ds.train.images[..., 0], [[[1, 2], [3, 4]], [[5, 6], [7, 8]]])


def test_csv_image_shape_override(tmp_path):
    rows = np.arange(32, dtype=np.uint8).reshape(2, 16)
    path = write_csv(tmp_path / "s.csv", [0, 1], rows)
    assert read_pixel_csv(path).train.images.shape == (2, 4, 4, 3)
    ds = read_pixel_csv(path, image_shape=(2, 8))
    assert ds.train.images.shape == (2, 2, 8, 3)
    np.testing.assert_array_equal(ds.train.images[1, :, :, 2], rows[1].reshape(2, 8))
    rgb = write_csv(tmp_path / "rgb.csv", [0], np.arange(24).reshape(1, 24))
    out = read_pixel_csv(rgb, image_shape=(2, 4), layout="planar").train.images
    np.testing.assert_array_equal(out[0, :, :, 1], np.arange(8, 16).reshape(2, 4))
    with pytest.raises(DataError, match="--csv-shape 3x3 needs 9"):
        read_pixel_csv(path, image_shape=(3, 3))


def test_csv_missing_label_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "x.csv", [0], np.zeros((1, 784)), header=[f"pixel{i}" for i in range(785)])
    with pytest.raises(DataError) as ei:
        read_pixel_csv(path)
    msg = str(ei.value)
    assert "no label column 'label'" in msg and "'pixel0', 'pixel1'" in msg and "785 columns" in msg
    assert "--label-column" in msg and "\n" not in msg


def test_csv_non_numeric_pixel_names_line_and_column(tmp_path):
    rows = np.zeros((5, 16), dtype=object)
    rows[2, 5] = "abc"
    path = write_csv(tmp_path / "x.csv", [0] * 5, rows)
    with pytest.raises(DataError, match=r"line 4, column 7 \('pixel5'\): 'abc' is not a number"):
        read_pixel_csv(path)


@pytest.mark.parametrize("sep,suffix", [(";", ".csv"), ("\t", ".tsv"), ("\t", ".csv")])
def test_pixel_tables_with_semicolons_or_tabs(tmp_path, real, sep, suffix):
    # Excel writes ';' where the decimal mark is a comma, and a .tsv has tabs: the same pixels
    # must come out as from a comma CSV, with quoted string labels and line-numbered errors
    x, y = real[0][:12], real[1][:12]
    path = write_csv(tmp_path / f"p{suffix}", [f'"c {v}"' for v in y], x.reshape(len(x), -1))
    path.write_text(path.read_text().replace(",", sep))
    ds = read_pixel_csv(path, layout="interleaved")
    np.testing.assert_array_equal(ds.train.images, x)
    assert [ds.classes[i] for i in ds.train.labels] == [f"c {v}" for v in y]
    src = load_source(str(path), csv_layout="interleaved", cache_dir=tmp_path / "cache")  # --data p.tsv too
    assert sorted(src.classes) == sorted(ds.classes) and len(src.train) + len(src.val or []) == len(x)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit(sep, 1)[0] + sep + "oops"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 4, column 3073 \('pixel3071'\): 'oops' is not a number"):
        read_pixel_csv(path, layout="interleaved")


def test_csv_other_errors(tmp_path):
    ok = np.zeros((3, 16), dtype=np.int64)
    p = tmp_path / "count.csv"
    write_csv(p, [0, 1, 2], ok)
    lines = p.read_text().splitlines()
    lines[2] += ",7"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 3 has 18 columns but the header has 17"):
        read_pixel_csv(p)

    big = ok.copy()
    big[1, 3] = 256
    with pytest.raises(DataError, match=r"line 3, column 5 \('pixel3'\): '256' is outside 0..255"):
        read_pixel_csv(write_csv(tmp_path / "big.csv", [0, 1, 2], big))

    with pytest.raises(DataError, match="no header row"):
        (tmp_path / "nohdr.csv").write_text("5,1,2,3,4\n1,2,3,4,5\n")
        read_pixel_csv(tmp_path / "nohdr.csv")
    # a first line of column numbers (0..n-1, pandas' header of an unnamed frame) is a header
    with pytest.raises(DataError, match="no label column 'label' \\(columns found: '0', '1'"):
        (tmp_path / "numbered.csv").write_text("0,1,2,3,4\n1,2,3,4,5\n")
        read_pixel_csv(tmp_path / "numbered.csv")
    with pytest.raises(DataError, match="no data rows"):
        (tmp_path / "hdr.csv").write_text("label,a,b,c,d\n")
        read_pixel_csv(tmp_path / "hdr.csv")
    with pytest.raises(DataError, match="is empty"):
        (tmp_path / "empty.csv").write_text("")
        read_pixel_csv(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="not HxW for a square image"):
        read_pixel_csv(write_csv(tmp_path / "odd.csv", [0], np.zeros((1, 10), dtype=int)))
    with pytest.raises(DataError, match="empty label"):
        (tmp_path / "nolab.csv").write_text("label,a,b,c,d\n,1,2,3,4\n")
        read_pixel_csv(tmp_path / "nolab.csv")


def test_csv_shape_option_for_non_square_images(tmp_path):
    # 48x64 grey faces, as exported from a numpy array: 3072 columns, which read as a square
    # image would be 3x32x32 RGB. The old message sent users to an option that did not exist.
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (4, 48, 64), dtype=np.uint8)
    path = write_csv(tmp_path / "faces.csv", [0, 1, 0, 1], faces.reshape(4, -1))
    with pytest.raises(DataError, match=r"channel order cannot be guessed.*not 32x32 RGB, give their shape with --csv-shape HxW"):
        read_pixel_csv(path)
    odd = write_csv(tmp_path / "odd.csv", [0, 1], faces[:2, :, :50].reshape(2, -1))  # 2400 columns
    with pytest.raises(DataError, match=r"give the image shape with --csv-shape HxW, e.g. --csv-shape 48x64"):
        read_pixel_csv(odd)
    for shape in ("48x64", "48 X 64", "48x64x1", (48, 64)):
        ds = read_pixel_csv(path, image_shape=shape)
        np.testing.assert_array_equal(ds.train.images[..., 1], faces)
    with pytest.raises(DataError, match=r"--csv-shape 48x64x3 needs 9216; fix --csv-shape 48x64x3"):
        read_pixel_csv(path, image_shape="48x64x3")
    for bad in ("48by64", "48x64x2", "0x64", "48"):
        with pytest.raises(DataError, match=r"is not an image shape; expected --csv-shape HxW"):
            read_pixel_csv(path, image_shape=bad)
    rgb = write_csv(tmp_path / "rgb.csv", [0, 1], rng.integers(0, 256, (2, 2 * 4 * 3)))
    assert read_pixel_csv(rgb, image_shape="2x4x3", layout="interleaved").train.images.shape == (2, 2, 4, 3)

    # and from the command line / a YAML file, through load_source as training reads data
    from imgclf.cli import build_parser
    from imgclf.config import make_config
    from imgclf.data.sources import load_source

    args = build_parser().parse_args(["check", "--data", str(path), "--csv-shape", "48x64"])
    cfg = make_config(data=args.data, csv_shape=args.csv_shape)
    src = load_source(cfg.data, csv_shape=cfg.csv_shape, val_split=0, cache_dir=tmp_path / "c")
    assert src.train.images.shape == (4, 48, 64, 3)


@pytest.mark.parametrize("index_header", ["", "Unnamed: 0", "id", "ID"])
def test_csv_index_and_id_columns_are_not_pixels(tmp_path, real, capsys, index_header):
    # pandas' df.to_csv() writes its index first, headed ""; Kaggle files carry an id column
    gray = real[0][:6, :28, :28, 0]
    pix = gray.reshape(6, -1)
    header = [index_header, "label"] + [f"pixel{i}" for i in range(784)]
    path = tmp_path / "train.csv"
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for i, (lab, row) in enumerate(zip(real[1][:6], pix, strict=True)):
            f.write(",".join([str(1000 + i) if index_header else str(i), str(lab), *map(str, row)]) + "\n")
    ds = read_pixel_csv(path)
    assert ds.train.images.shape == (6, 28, 28, 3)
    np.testing.assert_array_equal(ds.train.images[..., 0], gray)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 1" in err[0] and "row ids, not pixels: not read" in err[0]
