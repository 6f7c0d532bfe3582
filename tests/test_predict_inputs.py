"""predict reads archives in place and classifies any number of images in bounded chunks."""

from __future__ import annotations

import tarfile
import zipfile

import numpy as np
import pytest

import imgclf
from imgclf.cli import main
from imgclf.errors import UserError


def _images(sample_dir, n=12):
    return sorted((sample_dir / "test").glob("*/*.jpg"))[::37][:n]


def test_archive_members_predict_like_the_files(tiny_run, sample_dir, tmp_path):
    files = _images(sample_dir)
    zp, tg = tmp_path / "batch.zip", tmp_path / "batch.tar.gz"
    with zipfile.ZipFile(zp, "w") as zf:
        for f in files:
            zf.write(f, arcname=f"photos/{f.parent.name}/{f.name}")
        zf.writestr("photos/notes.txt", "not an image")  # skipped: not an image suffix
        zf.writestr("__MACOSX/photos/._x.jpg", b"\x00\x05")  # macOS junk: skipped
        zf.writestr("photos/broken.jpg", b"\xff\xd8\xff not really a jpeg")
    with tarfile.open(tg, "w:gz") as tf:
        for f in files:
            tf.add(f, arcname=f"{f.parent.name}/{f.name}")
    clf = imgclf.load(tiny_run)
    direct = clf.predict(files)
    from_zip = clf.predict([zp])
    from_tar = clf.predict(str(tg))
    assert [r["input"] for r in from_zip] == sorted(
        [f"{zp}/photos/{f.parent.name}/{f.name}" for f in files] + [f"{zp}/photos/broken.jpg"])
    bad = [r for r in from_zip if "error" in r]
    assert [r["input"] for r in bad] == [f"{zp}/photos/broken.jpg"] and "\n" not in bad[0]["error"]
    def key(name):  # class folder and file name
        return tuple(name.rsplit("/", 2)[-2:])

    by_member = {key(r["input"]): r["top"] for r in from_zip if "top" in r}
    for d in direct:  # same bytes, same decoding: the same probabilities
        name = key(d["input"])
        assert [c for c, _ in by_member[name]] == [c for c, _ in d["top"]]
        assert np.allclose([p for _, p in by_member[name]], [p for _, p in d["top"]], atol=1e-5)
    assert [r["input"].rsplit("/", 1)[-1] for r in from_tar] == [f.name for f in files]
    assert all("top" in r for r in from_tar)


def test_truncated_archive_keeps_what_it_read(tiny_run, sample_dir, tmp_path):
    files = _images(sample_dir, 40)
    clf = imgclf.load(tiny_run)
    for mode in ("w", "w:gz"):
        tg = tmp_path / ("cut.tar" + (".gz" if mode.endswith("gz") else ""))
        with tarfile.open(tg, mode) as tf:
            for f in files:
                tf.add(f, arcname=f.name)
        tg.write_bytes(tg.read_bytes()[: tg.stat().st_size // 2 + 300])  # mid-member, as a broken download
        res = clf.predict([tg])
        good = [r for r in res if "top" in r]
        assert 5 < len(good) < len(files), mode  # the first part was classified
        assert all("error" not in r for r in res[:-1]) and "not a readable archive" in res[-1]["error"], mode
        assert res[-1]["input"].startswith(str(tg)), mode


def test_chunks_give_the_same_answers_in_input_order(tiny_run, sample_dir):
    files = _images(sample_dir, 20)
    arr = np.zeros((32, 32, 3), np.uint8)
    inputs = [files[0], arr, *files[1:10], b"garbage bytes", *files[10:]]
    clf = imgclf.load(tiny_run)
    whole = clf.predict(inputs)
    chunked = clf.predict(inputs, chunk=3)
    # the CPU's kernels compute each image alike in any batch; cuDNN picks its algorithm by batch
    # size, so under bf16 autocast the same image's probabilities differ between batch sizes
    # (this check failed at 1e-5 on an H100). A misaligned chunk moves them by far more.
    atol = 1e-5 if clf.device.type == "cpu" else 2e-2
    assert [r["input"] for r in chunked] == [r["input"] for r in whole]
    assert chunked[1]["input"] == "input1" and "error" in chunked[11] and len(chunked) == 22
    for a, b in zip(whole, chunked):
        assert ("error" in a) == ("error" in b)
        if "top" in a:
            assert np.allclose([p for _, p in a["top"]], [p for _, p in b["top"]], atol=atol)


def test_missing_path_fails_before_any_work(tiny_run, sample_dir, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        imgclf.load(tiny_run).predict([_images(sample_dir, 1)[0], tmp_path / "typo.zip"])


def test_predict_cli_on_a_zip(tiny_run, sample_dir, tmp_path, capsys):
    zp = tmp_path / "few.zip"
    with zipfile.ZipFile(zp, "w") as zf:
        for f in _images(sample_dir, 3):
            zf.write(f, arcname=f.name)
    assert main(["predict", str(tiny_run), str(zp), "--top-k", "2", "--output", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].startswith(f"{zp}/")
    assert f"{zp}/" in capsys.readouterr().out


def test_in_memory_images_of_any_layout_predict_like_the_file(tiny_run, sample_dir):
    # arrays as people hold them (grey, RGBA, 16-bit, float in [0, 1], a PIL image, an N x H x W x C
    # batch) are converted the way training converted files, and a bad one is one error entry
    from PIL import Image

    f = _images(sample_dir, 1)[0]
    rgb = np.asarray(Image.open(f).convert("RGB"))
    clf = imgclf.load(tiny_run)
    ref = clf.predict([f])[0]["top"]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    same = [rgb, rgba, rgb.astype(np.uint16) * 257, rgb.astype(np.float32) / 255, Image.open(f)]
    out = clf.predict(same + [np.zeros((4, 4, 2), np.uint8)])
    for r in out[:5]:
        assert [c for c, _ in r["top"]] == [c for c, _ in ref]
        assert np.allclose([p for _, p in r["top"]], [p for _, p in ref], atol=0.02), r["input"]
    assert "HxWx4; got shape (4, 4, 2)" in out[5]["error"]
    grey = clf.predict(np.asarray(Image.open(f).convert("L")))
    assert len(grey) == 1 and "error" not in grey[0]
    batch = clf.predict(np.stack([rgb, rgb]))
    # the same image twice: the same answer (probabilities to float noise: CPU batch kernels may
    # sum a row in another order, ~1e-8 apart)
    assert len(batch) == 2 and [c for c, _ in batch[0]["top"]] == [c for c, _ in batch[1]["top"]]
    assert np.allclose([p for _, p in batch[0]["top"]], [p for _, p in batch[1]["top"]], rtol=0, atol=1e-6)


def test_predict_folder_follows_links_and_an_empty_folder_is_an_error(tiny_run, sample_dir, tmp_path, capsys):
    import os

    files = _images(sample_dir, 3)
    real = tmp_path / "elsewhere" / "cats"
    real.mkdir(parents=True)
    for f in files:
        (real / f.name).write_bytes(f.read_bytes())
    top = tmp_path / "photos"
    top.mkdir()
    os.symlink(real, top / "cats")
    assert len(imgclf.load(tiny_run).predict([top])) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["predict", str(tiny_run), str(empty)]) == 2
    assert "no images in" in capsys.readouterr().err


def test_predict_cli_keeps_names_that_are_not_utf8(tiny_run, sample_dir, tmp_path, capsysbinary):
    import json
    import os

    f = _images(sample_dir, 1)[0]
    folder = tmp_path / "odd"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # Latin-1 name: not valid UTF-8
    with open(raw, "wb") as out:
        out.write(f.read_bytes())
    csv_path = tmp_path / "p.csv"
    assert main(["predict", str(tiny_run), str(folder), "--output", str(csv_path)]) == 0
    assert b"caf\xe9.jpg" in csv_path.read_bytes()  # the file's own bytes, usable to open it again
    assert b"caf\\xe9.jpg" in capsysbinary.readouterr().out  # as class folder names are shown
    json_path = tmp_path / "p.json"
    assert main(["predict", str(tiny_run), str(folder), "--output", str(json_path)]) == 0
    text = json_path.read_text(encoding="utf-8")  # strict UTF-8, and no lone surrogate in it
    assert "\\udc" not in text and json.loads(text)[0]["input"].endswith("caf\\xe9.jpg")


def test_cli_options_are_not_abbreviated(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", "x", "--warmup", "2"])
    assert "unrecognized arguments: --warmup" in capsys.readouterr().err


def test_urls_are_fetched_and_one_that_fails_is_its_own_error(tiny_run, sample_dir, tmp_path, capsys, monkeypatch):
    # a local HTTP server stands in for the web: an image, a missing one, a page that is no image
    monkeypatch.setenv("no_proxy", "*")  # a machine's proxy would not reach this server
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from imgclf.data import remote

    files = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[:2]
    site = tmp_path / "site"
    site.mkdir()
    (site / "cat.jpg").write_bytes(files[0].read_bytes())
    (site / "page.html").write_text("<html>not an image</html>")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        clf = imgclf.load(tiny_run)
        got = clf.predict([f"{base}/cat.jpg", f"{base}/gone.jpg", str(files[1]), f"{base}/page.html"], top_k=2)
        want = clf.predict([str(files[0]), str(files[1])], top_k=2)
        assert [g["input"] for g in got] == [f"{base}/cat.jpg", f"{base}/gone.jpg", str(files[1]), f"{base}/page.html"]
        assert got[0]["top"] == want[0]["top"] and got[2]["top"] == want[1]["top"]
        assert got[1]["error"] == "HTTP 404 File not found"
        assert "not an image" in got[3]["error"] and "top" not in got[3]
        assert main(["predict", str(tiny_run), f"{base}/cat.jpg", "--top-k", "1"]) == 0
        assert capsys.readouterr().out.startswith(f"{base}/cat.jpg\t{want[0]['top'][0][0]}")
        assert remote.fetch(f"{base}/cat.jpg", max_bytes=100)[1] == "larger than 0 MB: not an image"
    finally:
        httpd.shutdown()
        httpd.server_close()
    # nobody listening: one line, as offline machines say it
    data, err = remote.fetch(f"{base}/cat.jpg", timeout=5)
    assert data is None and err.startswith("cannot fetch it (") and "\n" not in err


def test_an_arrays_pixels_are_read_by_one_rule_for_the_whole_batch(tiny_run, sample_dir):
    # predict converted each image of an array by its own range; training and evaluate convert the
    # whole array: a dark frame of a 12-bit batch, or a bright image of a -1..1 batch, was read
    # at another scale and its scores moved by up to 0.66
    import torch
    from PIL import Image

    from imgclf.data.images import pixels_to_uint8

    clf = imgclf.load(tiny_run)
    files = sorted((sample_dir / "test" / "cat").glob("*.jpg"))[:6]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    x12 = x.astype(np.uint16) * 4095 // 255
    x12[::2] //= 5  # under-exposed frames: on their own, their maximum says 8 bits, not 12
    want = clf.predict_proba(pixels_to_uint8(x12, "x"))
    np.testing.assert_allclose(clf.predict_proba(x12), want, atol=1e-6)
    signed = x.astype(np.float32) / 127.5 - 1
    signed[1] = np.abs(signed[1])  # a bright image: all of it >= 0, alone it reads as 0..1
    want = clf.predict_proba(pixels_to_uint8(signed, "x"))
    np.testing.assert_allclose(clf.predict_proba(signed), want, atol=1e-6)
    tensor = torch.from_numpy(signed).permute(0, 3, 1, 2)  # the same batch as torchvision lays it out
    np.testing.assert_allclose(clf.predict_proba(tensor), want, atol=1e-6)


def test_cli_says_each_unreadable_input_once_and_output_keeps_the_terminal_short(tiny_run, sample_dir,
                                                                                tmp_path, capsys):
    import shutil

    from imgclf.cli import PREDICT_ROWS_SHOWN

    folder = tmp_path / "many"
    folder.mkdir()
    for f in _images(sample_dir, PREDICT_ROWS_SHOWN + 5):
        shutil.copy(f, folder / f"{f.parent.name}_{f.name}")
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff cut short")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny_run), str(folder), "--output", str(out)]) == 1
    cap = capsys.readouterr()
    assert "zz_broken.jpg" not in cap.err  # it was a warning line as well as the ERROR row
    lines = cap.out.splitlines()
    assert sum("zz_broken.jpg\tERROR" in x for x in lines) == 1
    assert sum("\tERROR" not in x and x.startswith(str(folder)) for x in lines) == PREDICT_ROWS_SHOWN
    assert f"... 5 more in {out}" in lines and lines[-1] == f"wrote {out}: {PREDICT_ROWS_SHOWN + 6} inputs, 1 unreadable"
    assert len(out.read_text().splitlines()) == PREDICT_ROWS_SHOWN + 7  # the file has every row
    assert main(["predict", str(tiny_run), str(folder)]) == 1  # no file: every row on the terminal
    assert sum(x.startswith(str(folder)) for x in capsys.readouterr().out.splitlines()) == PREDICT_ROWS_SHOWN + 6
