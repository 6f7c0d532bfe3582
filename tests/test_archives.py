"""--data accepts .zip and .tar.* archives: extracted once into the cache, then read as a folder."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

import imgclf
from imgclf.data.sources import load_source
from imgclf.errors import UserError


def _tar(src: Path, out: Path, arcroot: str = "") -> Path:
    with tarfile.open(out, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(src / split, arcname=f"{arcroot}{split}")
    return out


def _zip(src: Path, out: Path, arcroot: str = "", junk: bool = False) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(src.rglob("*.jpg")):
            zf.write(f, arcname=f"{arcroot}{f.relative_to(src).as_posix()}")
        if junk:  # what macOS's "Compress" adds beside the real top folder
            zf.writestr(f"__MACOSX/{arcroot}._train", b"\x00\x05\x16\x07")
    return out


def _signature(src) -> tuple:
    return (src.classes, len(src.train), len(src.test),
            sorted(os.path.relpath(p, src.root or src.origin) for p in src.train.paths))


def test_tar_and_zip_read_like_the_folder(small_sample, tmp_path):
    cache = tmp_path / "cache"
    folder = load_source(str(small_sample), val_split=0.0, cache_dir=cache)
    tgz = load_source(str(_tar(small_sample, tmp_path / "cifar-small.tar.gz")), val_split=0.0, cache_dir=cache)
    # one wrapping folder, plus macOS junk beside it: still read from the wrapping folder
    zp = load_source(str(_zip(small_sample, tmp_path / "Photos.zip", arcroot="photos/", junk=True)),
                     val_split=0.0, cache_dir=cache)
    assert _signature(tgz) == _signature(folder) == _signature(zp)
    assert (len(folder.train), len(folder.test)) == (400, 100)
    assert tgz.name == "cifar-small" and zp.name == "Photos"
    assert tgz.origin == str(tmp_path / "cifar-small.tar.gz")  # what the user pointed at is recorded
    assert Path(zp.train.paths[0]).is_file() and str(cache / "archives") in zp.train.paths[0]


def test_extracted_once_and_again_when_the_archive_changes(small_sample, tmp_path):
    cache = tmp_path / "cache"
    arc = _tar(small_sample, tmp_path / "d.tar.gz")
    first = load_source(str(arc), val_split=0.0, cache_dir=cache)
    marker = Path(first.root) / "train" / "marker.txt"
    marker.write_text("kept")  # a re-extraction would lose it
    again = load_source(str(arc), val_split=0.0, cache_dir=cache)
    assert again.root == first.root and marker.exists()
    os.utime(arc, ns=(arc.stat().st_atime_ns, arc.stat().st_mtime_ns + 10**9))  # a new download
    changed = load_source(str(arc), val_split=0.0, cache_dir=cache)
    assert changed.root != first.root and not (Path(changed.root) / "train" / "marker.txt").exists()
    assert not list((cache / "archives").glob(".extract-*"))  # nothing half-done left behind


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad_crc", "cut_zip"])
def test_broken_archive_is_one_clear_error_and_leaves_nothing(small_sample, tmp_path, damage):
    cache = tmp_path / "cache"
    if damage == "cut_zip":  # a download cut short: no member list at its end (was read as a tar)
        arc = _zip(small_sample, tmp_path / "d.zip")
        arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
        with pytest.raises(UserError, match="a zip cut short"):
            load_source(str(arc), val_split=0.0, cache_dir=cache)
        from imgclf.data.archives import iter_archive_images

        assert [e for _, _, e in iter_archive_images(arc, {".jpg"})] == [
            "not a readable archive (a zip cut short: the list of its members at its end is missing; download it "
            "again)"]
    if damage == "bad_crc":
        arc = _zip(small_sample, tmp_path / "d.zip")
        data = bytearray(arc.read_bytes())
        with zipfile.ZipFile(arc) as zf:
            info = zf.infolist()[3]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        data[start + 100] ^= 0xFF  # flip a byte inside a stored member's data
        arc.write_bytes(bytes(data))
    else:
        arc = _tar(small_sample, tmp_path / "d.tar.gz")
        data = arc.read_bytes()
        arc.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an archive" * 100)
    with pytest.raises(UserError) as e:
        load_source(str(arc), val_split=0.0, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and str(arc) in msg
    assert "corrupt" in msg or "not a readable archive" in msg
    left = list((cache / "archives").iterdir()) if (cache / "archives").exists() else []
    assert left == []  # no partial folder that a later run could mistake for the data


@pytest.mark.parametrize("filters", [True, False], ids=["tarfile-filters", "python-before-3.11.4"])
@pytest.mark.parametrize("evil", ["escape", "symlink"])
def test_members_escaping_the_folder_are_refused(tmp_path, small_sample, monkeypatch, filters, evil):
    if not filters:  # Debian 12's Python 3.11.2 has no tarfile.data_filter: the same refusals by hand
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    arc = tmp_path / "evil.tar"
    with tarfile.open(arc, "w") as tf:
        tf.add(small_sample / "train", arcname="train")
        if evil == "escape":
            payload = b"owned"
            ti = tarfile.TarInfo("../../escaped.txt")
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
        else:
            ti = tarfile.TarInfo("train/cat/escaped.txt")
            ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(ti)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(UserError, match="not a readable archive .*(unsafe member refused|outside|link)") as e:
        load_source(str(arc), val_split=0.0, cache_dir=cache)
    assert "\n" not in str(e.value)
    assert not list(tmp_path.rglob("escaped.txt"))


def test_train_on_an_archive_end_to_end(small_sample, tmp_path):
    arc = _zip(small_sample, tmp_path / "pets.zip")
    res = imgclf.train(data=str(arc), epochs=1, project=str(tmp_path / "runs"), progress=False, tensorboard=False,
                       cache_dir=str(tmp_path / "cache"))
    assert res.run_dir.name.startswith("pets-")
    cfg = (res.run_dir / "config.yaml").read_text()
    assert str(arc) in cfg
    assert res.test is not None and res.test["n"] == 100 and res.test["top1"] > 0.2  # 0.3 measured, chance 0.1
    # evaluate takes an archive too; a copy at another path is extracted on its own
    shutil.copy(arc, tmp_path / "copy.zip")
    ev = imgclf.evaluate(res.run_dir, str(tmp_path / "copy.zip"), progress=False, cache_dir=str(tmp_path / "cache"))
    assert ev["n"] == 100 and ev["top1"] == pytest.approx(res.test["top1"], abs=0.011)
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 2


def _zip_of(members: dict[str, bytes], out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out


def test_kaggle_downloads_with_archives_inside_read_as_their_contents(small_sample, tmp_path):
    cats = sorted((small_sample / "train" / "cat").glob("*.jpg"))[:6]
    dogs = sorted((small_sample / "train" / "dog").glob("*.jpg"))[:6]
    # dogs-vs-cats.zip: train.zip (train/cat.0.jpg ...) + test1.zip (test1/1.jpg ...) + a CSV
    train = _zip_of({**{f"train/cat.{i}.jpg": f.read_bytes() for i, f in enumerate(cats)},
                     **{f"train/dog.{i}.jpg": f.read_bytes() for i, f in enumerate(dogs)}}, tmp_path / "train.zip")
    test1 = _zip_of({f"test1/{i}.jpg": f.read_bytes() for i, f in enumerate(cats[:3])}, tmp_path / "test1.zip")
    outer = _zip_of({"train.zip": train.read_bytes(), "test1.zip": test1.read_bytes(),
                     "sampleSubmission.csv": b"id,label\n1,0\n"}, tmp_path / "dogs-vs-cats.zip")
    src = load_source(str(outer), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == ["cat", "dog"] and len(src.train) == 12  # not classes 'train' and 'test1'
    root = Path(src.root)
    assert (root / "train" / "cat.0.jpg").is_file() and not list(root.glob("*.zip"))  # unzipped, not kept twice

    # an extraction made before inner archives were extracted is completed in place
    shutil.rmtree(root / "train")
    shutil.copy(tmp_path / "train.zip", root / "train.zip")
    again = load_source(str(tmp_path / "dogs-vs-cats.zip"), val_split=0, cache_dir=tmp_path / "cache")
    assert again.classes == ["cat", "dog"] and len(again.train) == 12 and not (root / "train.zip").exists()

    # aerial-cactus.zip: train.zip of ids, their labels in train.csv beside it
    ids = {f"{i:04x}a1.jpg": ("1" if f in cats else "0") for i, f in enumerate(cats + dogs)}
    train = _zip_of({f"train/{name}": f.read_bytes() for name, f in zip(ids, cats + dogs)}, tmp_path / "t.zip")
    csv_text = "id,has_cactus\n" + "".join(f"{k},{v}\n" for k, v in ids.items())
    outer = _zip_of({"train.zip": train.read_bytes(), "train.csv": csv_text.encode()}, tmp_path / "cactus.zip")
    src = load_source(str(outer), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == ["0", "1"] and sorted(src.train.labels.tolist()) == [0] * 6 + [1] * 6

    # a damaged archive inside: one line naming it, nothing left half-extracted
    outer = _zip_of({"train.zip": b"PK\x03\x04 not really"}, tmp_path / "bad.zip")
    with pytest.raises(UserError, match=r"train.zip in it is not a readable archive") as e:
        load_source(str(outer), val_split=0, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not any(p.name.startswith("bad-") for p in (tmp_path / "cache" / "archives").iterdir())

    # the download unzipped by hand once: the folder of archives says what to do
    unzipped = tmp_path / "unzipped"
    unzipped.mkdir()
    shutil.copy(train, unzipped / "train.zip")
    (unzipped / "train.csv").write_text(csv_text)
    with pytest.raises(UserError, match=r"it holds archives: train.zip; give --data the archive it came in"):
        load_source(str(unzipped), val_split=0, cache_dir=tmp_path / "cache")
