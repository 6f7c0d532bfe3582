"""``imgclf cache``: what the cache holds, and freeing it without touching anything else."""

from __future__ import annotations

import fcntl
import json
import os
import tarfile
import time
from pathlib import Path

from imgclf.cli import main
from imgclf.data.cache import build_cache
from imgclf.data.sources import load_source

DAY = 86400


def _age(paths, days: float) -> None:
    t = time.time() - days * DAY
    for p in paths:
        os.utime(p, (t, t))


def _decode(data: Path, root: Path, size: int):
    src = load_source(str(data), val_split=0.0, cache_dir=root)
    return build_cache(src.train, size, "stretch", root / "images", workers=1, progress=False)


def test_lists_and_clears_only_what_no_run_used_and_nothing_of_the_users(small_sample, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich folds long paths at the terminal's width
    root = tmp_path / "cache"
    _decode(small_sample, root, 24)
    new = _decode(small_sample, root, 32)
    with tarfile.open(tmp_path / "photos.tar.gz", "w:gz") as tf:
        tf.add(small_sample / "train", arcname="photos")
    load_source(str(tmp_path / "photos.tar.gz"), val_split=0.0, cache_dir=root)
    (root / "datasets" / "cifar-10-batches-py").mkdir(parents=True)
    (root / "datasets" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x" * 5000)
    saved = root / "arrays" / "arrays-0123456789abcdef.npz"  # imgclf.train(data=(x, y))'s copy
    saved.parent.mkdir()
    saved.write_bytes(b"x" * 5000)
    # the user's own files beside the cache (--cache-dir pointed at a working folder)
    mine = [root / "notes.txt", root / "images" / "features.npy", root / "archives" / "keep-me"]
    mine[2].mkdir()
    for p in mine[:2]:
        p.write_bytes(b"mine")
    # a build still running (its lock held) and one left by a killed build
    live, dead = root / "images" / "a.1.x.tmp.npy", root / "images" / "b.2.y.tmp.npy"
    live.write_bytes(b"0")
    dead.write_bytes(b"0")
    held = open(live, "rb")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

    old_key = next(j.stem for j in (root / "images").glob("*.json") if json.loads(j.read_text())["size"] == 24)
    old_files = [root / "images" / f"{old_key}.npy", root / "images" / f"{old_key}.json"]
    _age(old_files + list((root / "archives").glob("photos-*")), 40)

    assert main(["cache", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{len(new)} images at 32 px stretch, from {small_sample / 'train'}" in out
    assert "24 px" in out and "extracted photos" in out and "downloaded cifar-10-batches-py" in out
    assert "arrays saved by imgclf.train" in out
    assert "40 days ago" in out and "removes 3 of them" in out and "downloads and arrays are kept" in out

    # reused now: an entry's age is its last use, not its creation
    load_source(str(tmp_path / "photos.tar.gz"), val_split=0.0, cache_dir=root)
    assert main(["cache", "--cache-dir", str(root), "--older-than", "30d"]) == 0
    out = capsys.readouterr().out
    assert "24 px" in out and "32 px" not in out and "photos" not in out and "1 entries unused for 30d" in out

    assert main(["cache", "--cache-dir", str(root), "--older-than", "30d", "--clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not any(p.exists() for p in old_files)
    assert _decode(small_sample, root, 32).images.shape[1] == 32  # the other entries are still there
    assert len(list((root / "archives").glob("photos-*"))) == 1

    assert main(["cache", "--cache-dir", str(root), "--clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert not list((root / "images").glob("*.json")) and not list((root / "archives").glob("photos-*"))
    assert (root / "datasets" / "cifar-10-batches-py").is_dir() and saved.exists()  # only with --downloads
    assert all(p.exists() for p in mine) and live.exists() and not dead.exists()
    held.close()

    assert main(["cache", "--cache-dir", str(root), "--clear", "--downloads"]) == 0
    assert not (root / "datasets" / "cifar-10-batches-py").exists() and not saved.exists()
    assert all(p.exists() for p in mine)


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["cache", "--cache-dir", str(tmp_path / "nowhere")]) == 2
    assert "--cache-dir" in capsys.readouterr().err
    assert main(["cache", "--cache-dir", str(tmp_path), "--older-than", "soon"]) == 2
    err = capsys.readouterr().err
    assert "--older-than soon: must be a positive finite duration" in err and err.count("\n") == 1


def test_a_large_cache_says_how_to_free_it_once(small_sample, tmp_path, monkeypatch, capsys):
    from imgclf.data import cache

    monkeypatch.setattr(cache, "LARGE_CACHE_BYTES", 100_000)
    monkeypatch.setattr(cache, "_noted", set())
    root = tmp_path / "cache"
    _decode(small_sample, root, 16)  # 400 x 16 x 16 x 3 = 300 KB, over the limit set above
    _decode(small_sample, root, 20)
    err = capsys.readouterr().err
    assert err.count("'imgclf cache' lists it") == 1 and f"cache in {root} holds" in err


def test_a_cache_decoded_from_a_relative_path_names_its_folder_absolutely(small_sample, tmp_path, capsys, monkeypatch):
    # 'imgclf check flat' from one folder, 'imgclf cache' from another: 'from flat/train' had lost
    # the folder it was relative to
    monkeypatch.setenv("COLUMNS", "400")
    root = tmp_path / "cache"
    monkeypatch.chdir(small_sample.parent)
    new = _decode(Path(small_sample.name), root, 20)
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "--cache-dir", str(root)]) == 0
    assert f"{len(new)} images at 20 px stretch, from {small_sample / 'train'}" in capsys.readouterr().out
