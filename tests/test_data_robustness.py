"""What real disks hand the data layer: names that are not UTF-8, phone and NAS formats and debris,
link loops, Kaggle's unlabelled test folder, a full or read-only cache disk, caches shared by
containers. Every case is built in tmp_path from the packaged CIFAR-10 sample's real JPEGs."""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import archives, cache, images, sources
from imgclf.data.cache import build_cache
from imgclf.data.sources import Split, load_source, membership
from imgclf.errors import UserError


def _photos(sample_dir: Path, cls: str, n: int) -> list[Path]:
    return sorted((sample_dir / "train" / cls).glob("*.jpg"))[:n]


def _class_tree(sample_dir: Path, root: Path, classes: dict[str, int]) -> Path:
    """root/<class>/ with n real photos each; a class the sample lacks (_background) gets ships."""
    for c, n in classes.items():
        (root / c).mkdir(parents=True)
        for f in _photos(sample_dir, c if (sample_dir / "train" / c).is_dir() else "ship", n):
            shutil.copy(f, root / c / f.name)
    return root


# -- 2. names that are not UTF-8 ---------------------------------------------------------------


def test_latin1_and_gbk_names_train_split_and_cache(sample_dir, tmp_path):
    # "bébé" in Latin-1 and "狗" (dog) in GBK, as copied from an old disk or a Windows zip:
    # os.listdir hands them over with surrogate escapes, which str.encode() refuses
    root = os.fsencode(tmp_path / "pets")
    for cls, src_cls in ((b"b\xe9b\xe9", "cat"), (b"\xb9\xb7", "dog")):
        os.makedirs(root + b"/" + cls)
        for i, f in enumerate(_photos(sample_dir, src_cls, 6)):
            shutil.copy(f, root + b"/" + cls + b"/photo-\xe9t\xe9-%d.jpg" % i)
    src = load_source(os.fsdecode(root), val_split=0.34, cache_dir=tmp_path / "c")
    # class names end up in model.json, CSVs and reports, UTF-8 files all: the bytes are spelled out
    assert src.classes == ["\\xb9\\xb7", "b\\xe9b\\xe9"]
    assert any("are not UTF-8 and are shown with \\x escapes" in p for p in src.problems)
    assert all(os.path.exists(p) for p in src.train.paths + src.val.paths)
    assert len(src.train) == 8 and len(src.val) == 4
    digest = membership(src)["digest"]
    assert digest == membership(load_source(os.fsdecode(root), val_split=0.34, cache_dir=tmp_path / "c"))["digest"]
    cs = build_cache(src.train, 32, "stretch", tmp_path / "c" / "images", workers=1, progress=False)
    assert len(cs) == 8 and not cs.problems
    assert cs.images[cs.rows].reshape(8, -1).std(axis=1).min() > 5  # decoded photos, not blanks


def test_accented_class_names_from_a_mac_match_the_same_names_made_on_linux(sample_dir, tmp_path):
    import unicodedata

    composed, decomposed = "café", unicodedata.normalize("NFD", "café")
    assert composed != decomposed and len(decomposed) == 5
    root = tmp_path / "d"
    _class_tree(sample_dir, root / "train", {"cat": 3})
    _class_tree(sample_dir, root / "test", {"cat": 2})
    (root / "train" / "cat").rename(root / "train" / decomposed)  # copied from macOS: decomposed
    (root / "test" / "cat").rename(root / "test" / composed)  # typed on Linux: composed
    _class_tree(sample_dir, root / "train", {"dog": 3})
    _class_tree(sample_dir, root / "test", {"dog": 2})
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == [composed, "dog"] and not [p for p in src.problems if "escape" in p]
    assert list(src.test.labels).count(0) == 2 and list(src.train.labels).count(0) == 3


def test_images_outside_any_class_folder_are_reported_not_dropped_silently(sample_dir, tmp_path):
    root = _class_tree(sample_dir, tmp_path / "d", {"cat": 3, "dog": 3})
    shutil.copy(_photos(sample_dir, "cat", 4)[3], root / "unsorted.jpg")
    (root / "notes.txt").write_text("not an image")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert len(src.train) == 6
    (note,) = [p for p in src.problems if "outside any class folder" in p]
    assert note == f"{root}: 1 image(s) outside any class folder (e.g. unsorted.jpg) are not used; " \
                   "move them into the folder of their class"


# -- 3. photo formats ------------------------------------------------------------------------


def test_jpeg_aliases_and_avif_are_read(sample_dir, tmp_path):
    root = _class_tree(sample_dir, tmp_path / "d", {"cat": 2, "dog": 2})
    cat, dog = _photos(sample_dir, "cat", 4), _photos(sample_dir, "dog", 3)
    shutil.copy(cat[2], root / "cat" / "from-windows.jfif")
    shutil.copy(cat[3], root / "cat" / "old-camera.JPE")
    if images.AVIF_READABLE:
        Image.open(dog[2]).save(root / "dog" / "phone.avif", quality=90)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    names = sorted(os.path.basename(p) for p in src.train.paths)
    assert "from-windows.jfif" in names and "old-camera.JPE" in names
    assert ("phone.avif" in names) == images.AVIF_READABLE
    cs = build_cache(src.train, 32, "stretch", tmp_path / "c" / "images", workers=1, progress=False)
    assert len(cs) == len(src.train) and not cs.problems, cs.problems


def _heif_bytes(photo: Path) -> bytes:
    """A HEIF file: Pillow writes AVIF, the AV1 profile of the same ISO-BMFF container an iPhone's
    .heic is (there is no HEVC encoder here to write the HEVC one)."""
    buf = io.BytesIO()
    Image.open(photo).save(buf, "AVIF")
    return buf.getvalue()


@pytest.mark.skipif(not images.AVIF_READABLE, reason="this Pillow cannot write AVIF")
def test_heic_without_pillow_heif_is_counted_and_named_once(sample_dir, tmp_path, monkeypatch):
    # as on a machine without pillow-heif, whether or not this one has it
    monkeypatch.setattr(sources, "IMAGE_EXTENSIONS", sources.IMAGE_EXTENSIONS - {".heic", ".heif"})
    monkeypatch.setattr(sources, "UNREADABLE_IMAGE_EXTENSIONS", {
        **sources.UNREADABLE_IMAGE_EXTENSIONS, ".heic": "pip install pillow-heif to read them",
        ".heif": "pip install pillow-heif to read them"})
    root = _class_tree(sample_dir, tmp_path / "d", {"cat": 3, "dog": 3})
    for cls in ("cat", "dog"):
        for i, f in enumerate(_photos(sample_dir, cls, 2)):
            (root / cls / f"IMG_{i:04d}.HEIC").write_bytes(_heif_bytes(f))
    (root / "dog" / "IMG_0100.CR2").write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00")
    (root / "dog" / "notes.txt").write_text("not a picture: not counted")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert len(src.train) == 6
    heic = [p for p in src.problems if "pillow-heif" in p]
    assert len(heic) == 1 and "4 .heic file(s) skipped: pip install pillow-heif" in heic[0]
    assert any("1 .cr2 file(s) skipped: camera raw" in p for p in src.problems)
    assert not any("txt" in p for p in src.problems)

    only_heic = tmp_path / "phone"
    (only_heic / "cat").mkdir(parents=True)
    (only_heic / "dog").mkdir()
    for cls in ("cat", "dog"):
        (only_heic / cls / "IMG_0001.heic").write_bytes(_heif_bytes(_photos(sample_dir, cls, 1)[0]))
    with pytest.raises(UserError, match=r"no images found .*2 \.heic file\(s\) skipped: pip install pillow-heif"):
        load_source(str(only_heic), val_split=0, cache_dir=tmp_path / "c")


def test_heic_is_read_when_pillow_heif_is_installed(sample_dir, tmp_path):
    pillow_heif = pytest.importorskip("pillow_heif")
    assert images.HEIF_READABLE and ".heic" in images.IMAGE_EXTENSIONS
    root = _class_tree(sample_dir, tmp_path / "phone", {"cat": 2, "dog": 2})
    photo = np.asarray(Image.open(_photos(sample_dir, "dog", 3)[2]).convert("RGB"))
    pillow_heif.from_pillow(Image.fromarray(photo)).save(root / "dog" / "IMG_0001.HEIC", quality=95)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert len(src.train) == 5 and not src.problems
    assert np.abs(images.load_rgb(root / "dog" / "IMG_0001.HEIC").astype(int) - photo).mean() < 4


# -- 4. Kaggle's unlabelled test folder --------------------------------------------------------


def test_flat_unlabelled_test_folder_is_set_aside_with_a_warning(sample_dir, tmp_path):
    root = _class_tree(sample_dir, tmp_path / "kaggle" / "train", {"cat": 4, "dog": 4}).parent
    (root / "test").mkdir()
    for i, f in enumerate(_photos(sample_dir, "ship", 5)):
        shutil.copy(f, root / "test" / f"{i}.png")  # Kaggle names them by id
    src = load_source(str(root), val_split=0.25, cache_dir=tmp_path / "c")
    assert src.classes == ["cat", "dog"] and src.test is None and len(src.train) + len(src.val) == 8
    note = [p for p in src.problems if "unlabelled" in p]
    assert len(note) == 1 and note[0].startswith(f"{root / 'test'}: 5 unlabelled images and no class folders; "
                                                 "ignored as a test split")
    assert "imgclf predict" in note[0]

    # a test folder with class folders the training data lacks is still an error
    shutil.rmtree(root / "test")
    _class_tree(sample_dir, root / "test", {"ship": 2})
    with pytest.raises(UserError, match="classes the training data does not have: ship"):
        load_source(str(root), val_split=0, cache_dir=tmp_path / "c")


# -- 6, 7. a full or unwritable cache disk -----------------------------------------------------


def test_full_disk_is_refused_before_the_memory_map(sample_dir, tmp_path, monkeypatch):
    src = load_source(str(sample_dir / "test"), val_split=0, cache_dir=tmp_path / "c")
    root = tmp_path / "c" / "images"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5 << 20))
    with pytest.raises(UserError) as ei:
        build_cache(src.train, 224, "stretch", root, workers=1, progress=False)
    msg = str(ei.value)
    need = f"{(len(src.train) * 224 * 224 * 3 + cache._SPACE_MARGIN) / 2**20:.0f} MiB"
    assert f"needs {need} in {root}" in msg and "5 MiB free" in msg and "\n" not in msg
    assert "IMGCLF_CACHE=DIR" in msg and "--cache-dir DIR" in msg
    assert list(root.iterdir()) == []  # no sparse file left to fill the disk later


def test_a_disk_filled_since_the_space_check_is_one_line_not_a_bus_error(sample_dir, tmp_path, monkeypatch):
    # two runs both pass the free-space check; the second to reserve its cache file finds the disk
    # full: the file is allocated up front, so that is an error here, not a SIGBUS in the memory map
    import errno

    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    src = load_source(str(sample_dir / "test"), val_split=0, cache_dir=tmp_path / "c")
    root = tmp_path / "c" / "images"
    with pytest.raises(UserError) as ei:
        build_cache(src.train, 32, "stretch", root, workers=1, progress=False)
    msg = str(ei.value)
    assert msg.startswith(f"the decoded-image cache needs 67 MiB in {root} but the disk has ") and "\n" not in msg
    assert "free some space" in msg and "IMGCLF_CACHE=DIR" in msg
    assert calls and calls[0] >= len(src.train) * 32 * 32 * 3  # the whole file was asked for
    assert not list(root.glob("*.tmp*")) and list(root.iterdir()) == []
    # arrays resized to a disk cache (CIFAR upscaled) reserve their file too
    arrays = Split(labels=np.zeros(4, np.int64), images=np.zeros((4, 8, 8, 3), np.uint8))
    monkeypatch.setattr(cache, "ARRAYS_IN_RAM", 0)
    with pytest.raises(UserError, match="^the decoded-image cache needs .* free: free some space"):
        build_cache(arrays, 16, "stretch", tmp_path / "arr", progress=False)
    assert list((tmp_path / "arr").iterdir()) == []


def _die_of_sigbus(args):
    """What a worker writing into the memory map on a full disk gets."""
    import faulthandler

    faulthandler.disable()  # pytest's handler, inherited through fork, would print a stack to the log
    os.kill(os.getpid(), signal.SIGBUS)


def _alarm(signum, frame):
    raise TimeoutError("the decode pool hung after a worker died")


def test_a_worker_killed_mid_decode_is_an_error_not_a_hang(sample_dir, tmp_path, monkeypatch):
    files = [str(p) for p in sorted((sample_dir / "test").glob("*/*.jpg"))]
    paths = (files * (3 * cache._CHUNK // len(files) + 1))[: 3 * cache._CHUNK]  # enough for the pool
    monkeypatch.setattr(cache, "_decode_chunk", _die_of_sigbus)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)
    try:
        with pytest.raises(UserError, match="a process decoding images into .* died"):
            build_cache(Split(labels=np.zeros(len(paths), np.int64), paths=paths), 8, "stretch",
                        tmp_path / "cache", workers=2, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not list((tmp_path / "cache").glob("*.tmp.*"))  # the temp file went with the build


def test_unwritable_cache_folder_is_one_line(sample_dir, tmp_path):
    src = load_source(str(sample_dir / "test"), val_split=0, cache_dir=tmp_path / "c")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(UserError) as ei:
        build_cache(src.train, 32, "stretch", blocker / "images", progress=False)
    msg = str(ei.value)
    assert msg.startswith(f"cannot use the decoded-image cache folder {blocker / 'images'}: ")
    assert "IMGCLF_CACHE=DIR" in msg and "\n" not in msg

    archive = shutil.make_archive(str(tmp_path / "pets"), "zip", sample_dir / "test")
    with pytest.raises(UserError, match=r"cannot extract into .*not-a-folder/archives: .*IMGCLF_CACHE=DIR"):
        load_source(archive, val_split=0, cache_dir=blocker)


def test_read_only_cache_folder_is_one_line(sample_dir, tmp_path, monkeypatch):
    import errno

    src = load_source(str(sample_dir / "test"), val_split=0, cache_dir=tmp_path / "c")
    ro = tmp_path / "ro"
    ro.mkdir()
    # a folder this user may not write (chmod 0500 would not stop root, who runs CI): creating a
    # file in it fails as the kernel fails it there
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(UserError, match=r"^cannot use the decoded-image cache folder .*/ro: Permission denied; "
                                        r"point the cache at another folder with IMGCLF_CACHE=DIR or --cache-dir DIR$"):
        build_cache(src.train, 32, "stretch", ro, progress=False)
    assert list(ro.iterdir()) == []


# -- 8, 9. link loops, NAS debris, class names ---------------------------------------------------


def test_link_loops_read_each_image_once(sample_dir, tmp_path):
    root = _class_tree(sample_dir, tmp_path / "d", {"cat": 3, "dog": 3})
    (root / "cat" / "2019").mkdir()
    shutil.copy(_photos(sample_dir, "cat", 4)[3], root / "cat" / "2019" / "new.jpg")
    os.symlink("..", root / "cat" / "2019" / "loop")  # back up to cat/
    os.symlink("../..", root / "dog" / "everything")  # up to the data root: every class
    shared = tmp_path / "elsewhere"
    shared.mkdir()
    shutil.copy(_photos(sample_dir, "dog", 5)[4], shared / "kept.jpg")
    os.symlink(shared, root / "dog" / "more")  # a link out of the tree is read, once
    os.symlink(shared, root / "dog" / "more-again")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    labels = dict(zip(src.train.paths, src.train.labels.tolist(), strict=True))
    assert len(src.train) == 4 + 4
    assert sorted(labels.values()) == [0] * 4 + [1] * 4
    assert sum(os.path.basename(p) == "kept.jpg" for p in labels) == 1
    assert any("3 folder link(s) lead back to folders already read" in p for p in src.problems)


def test_nas_debris_is_skipped_and_underscore_classes_are_kept(sample_dir, tmp_path):
    root = _class_tree(sample_dir, tmp_path / "nas", {"cat": 3, "dog": 3, "_background": 2})
    thumb = _photos(sample_dir, "cat", 1)[0]
    for cls in ("cat", "dog"):
        for f in list((root / cls).glob("*.jpg")):
            # Synology: @eaDir/<photo name>/SYNOPHOTO_THUMB_*.jpg, real JPEG thumbnails
            d = root / cls / "@eaDir" / f.name
            d.mkdir(parents=True)
            for size in ("S", "M", "XL"):
                shutil.copy(thumb, d / f"SYNOPHOTO_THUMB_{size}.jpg")
    for junk in ("@eaDir", "#recycle", "#snapshot", "@Recycle", ".@__thumb", "__MACOSX", "__pycache__"):
        (root / junk / "x").mkdir(parents=True, exist_ok=True)
        shutil.copy(thumb, root / junk / "x" / "deleted.jpg")
    (root / "dog" / "#recycle").mkdir()
    shutil.copy(thumb, root / "dog" / "#recycle" / "deleted.jpg")
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    assert src.classes == ["_background", "cat", "dog"]
    assert len(src.train) == 8
    assert not any("THUMB" in p or "deleted" in p for p in src.train.paths)


# -- 10. temp files of caches shared by containers ---------------------------------------------


def test_cache_temp_files_of_two_pid_1_writers_differ_and_stale_ones_are_cleaned(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 1)  # two containers sharing a cache volume: both pid 1
    with archives.locked_temp(tmp_path, "k", ".npy") as a, archives.locked_temp(tmp_path, "k", ".npy") as b:
        assert a != b and a.name.startswith("k.1.") and a.name.endswith(".tmp.npy")
        a.write_bytes(b"a")
        b.write_bytes(b"b")
        os.utime(a, (1e9, 1e9))  # untouched for years, but its writer is alive: kept
        archives.remove_stale(tmp_path, "*.tmp.*")
        assert a.exists() and b.exists()
    old = time.time() - 2 * 3600
    os.utime(a, (old, old))  # the writer is gone (no lock) and pid 1 is alive: removed all the same
    archives.remove_stale(tmp_path, "*.tmp.*")
    assert not a.exists() and b.exists()  # b is young: perhaps another machine's, on a disk without locks


def test_cache_build_leaves_no_temp_files_and_a_shareable_cache(sample_dir, tmp_path, monkeypatch):
    src = load_source(str(sample_dir / "test"), val_split=0, cache_dir=tmp_path / "c")
    root = tmp_path / "cache"
    root.mkdir()
    stale = root / "0123abcd.1.k3y9x0zq.tmp.npy"  # a pid-1 container's build, killed two hours ago
    stale.write_bytes(b"x" * 1000)
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    build_cache(src.train, 16, "stretch", root, workers=1, progress=False)
    files = sorted(root.iterdir())
    assert [f.suffix for f in files] == [".json", ".npy"]  # the stale one is gone, no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(files[1].stat().st_mode) == 0o666 & ~umask  # readable by the cache's other users


def test_data_check_of_a_big_png_prints_no_raw_pil_warning(tmp_path, monkeypatch, recwarn):
    # a PNG over PIL's MAX_IMAGE_PIXELS (but under twice it) is read with a DecompressionBombWarning
    # that reached the log raw; the check's header reads hide it, as the decoder does
    import warnings

    from imgclf.data.checks import run_checks

    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    big = root / "a" / "big.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(big)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "c")
    cached = {"train": build_cache(src.train, 16, "stretch", tmp_path / "c" / "images", workers=1, progress=False)}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600: a warning, not an error
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(big).close()
    recwarn.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        report = run_checks(src, cached, grid=False)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert report.stats["images"]["sampled"] == 7 and report.stats["images"]["sizes"]["40x40"] == 1
