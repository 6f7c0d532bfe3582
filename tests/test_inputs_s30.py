"""A user's own photos through predict, explain and evaluate: the inputs that broke them (s30)."""

from __future__ import annotations

import os
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

import imgclf


def _photo(sample_dir: Path, cls: str = "ship", i: int = 0) -> Path:
    return sorted((sample_dir / "test" / cls).glob("*.jpg"))[i]


def _fifo_with(tmp_path: Path, data: bytes, name: str = "photo.fifo") -> tuple[Path, threading.Thread]:
    """A named pipe that a thread writes ``data`` into once a reader opens it (as ``<(curl ...)``
    and ``/dev/stdin`` hand over a download): its size reads 0, and it cannot be read twice."""
    path = tmp_path / name
    os.mkfifo(path)

    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return path, t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_predict_reads_a_photo_from_a_pipe(tiny_run, sample_dir, tmp_path):
    # `cat photo.jpg | imgclf predict RUN /dev/stdin` said "ERROR empty file": a pipe's size is 0
    photo = _photo(sample_dir)
    clf = imgclf.load(tiny_run, "cpu")
    pipe, writer = _fifo_with(tmp_path, photo.read_bytes())
    got = clf.predict([pipe], top_k=3)
    writer.join(5)
    want = clf.predict([photo], top_k=3)
    assert "error" not in got[0], got[0]
    assert [c for c, _ in got[0]["top"]] == [c for c, _ in want[0]["top"]]
    assert got[0]["top"][0][1] == pytest.approx(want[0]["top"][0][1], abs=1e-6)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_an_empty_pipe_is_one_error_row_not_a_crash(tiny_run, sample_dir, tmp_path):
    pipe, writer = _fifo_with(tmp_path, b"")
    photo = _photo(sample_dir)
    res = imgclf.load(tiny_run, "cpu").predict([pipe, photo], top_k=1)
    writer.join(5)
    assert "empty" in res[0]["error"] and "top" in res[1]  # the batch goes on


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_explain_reads_a_pipe_once(tiny_run, sample_dir, tmp_path, capsys):
    # explain decoded its input twice (the model's view, then the picture to draw on): the second
    # read of a pipe found nothing and ended the command in a traceback
    from imgclf.cli import main

    pipe, writer = _fifo_with(tmp_path, _photo(sample_dir).read_bytes())
    out = tmp_path / "cams"
    assert main(["explain", str(tiny_run), str(pipe), "--out", str(out), "--device", "cpu"]) == 0
    writer.join(5)
    assert (out / "photo_gradcam.png").stat().st_size > 1000
    assert "ERROR" not in capsys.readouterr().out


@pytest.mark.skipif(os.name != "posix", reason="file names of raw bytes are a POSIX thing")
def test_explain_a_file_name_that_is_not_utf8(tiny_run, sample_dir, tmp_path, capsys):
    # a Latin-1 name from an old camera card or a Windows share: matplotlib could not draw the
    # lone surrogate in the title, and the whole batch ended in a TypeError traceback
    from imgclf.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    odd = photos / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(_photo(sample_dir, "cat"), odd)
    shutil.copy(_photo(sample_dir, "ship"), photos / "ship.jpg")
    out = tmp_path / "cams"
    try:
        rc = main(["explain", str(tiny_run), str(photos), "--out", str(out), "--device", "cpu"])
    except FileNotFoundError:
        pytest.skip("this file system does not take non-UTF-8 names")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert len(list(out.glob("*_gradcam.png"))) == 2  # both explained
    assert "caf\\xe9.jpg\t" in printed  # named as predict names it
    assert (out / os.fsdecode(b"caf\xe9_gradcam.png")).exists()  # the PNG keeps the file's own bytes


class _Unflagged(zipfile.ZipInfo):
    """A member whose name is stored as UTF-8 bytes without the flag that says so, as Info-ZIP's
    zip and macOS's Archive Utility write them (zipfile itself sets the flag)."""

    def _encodeFilenameFlags(self):
        return self.filename.encode("utf-8"), self.flag_bits


def test_predict_names_utf8_zip_members_as_written(tiny_run, sample_dir, tmp_path):
    # Info-ZIP's zip (Linux) and macOS store UTF-8 names without the UTF-8 flag; zipfile reads
    # them as code page 437, and predict reported 'photos.zip/caf├⌐/ü.jpg'
    zpath = tmp_path / "photos.zip"
    data = _photo(sample_dir).read_bytes()
    with zipfile.ZipFile(zpath, "w") as zf:
        for name in ("café/über.jpg", "plain.jpg"):
            zf.writestr(_Unflagged(name), data)
    with zipfile.ZipFile(zpath) as zf:
        assert all(not i.flag_bits & 0x800 for i in zf.infolist())  # written as the tools write them
    res = imgclf.load(tiny_run, "cpu").predict([zpath], top_k=1)
    assert [r["input"] for r in res] == [f"{zpath}/café/über.jpg", f"{zpath}/plain.jpg"]
    assert all("top" in r for r in res)


def test_zip_member_names_that_are_not_utf8_stay_as_read():
    from imgclf.data.archives import zip_member_name

    info = zipfile.ZipInfo(b"r\x82sum\x82.jpg".decode("cp437"))  # 'résumé' in DOS's own code page
    assert zip_member_name(info) == "résumé.jpg"
    flagged = zipfile.ZipInfo("café.jpg")
    flagged.flag_bits |= 0x800
    assert zip_member_name(flagged) == "café.jpg"


@pytest.mark.parametrize("typo, near", [("Cat", "cat"), ("trucks", "truck"), ("aeroplane", "airplane")])
def test_explain_class_typo_names_the_class_meant(tiny_run, sample_dir, tmp_path, capsys, typo, near):
    from imgclf.cli import main

    out = tmp_path / "cams"
    assert main(["explain", str(tiny_run), str(_photo(sample_dir)), "--class", typo, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"did you mean '{near}'" in err
    assert not out.exists()


def test_a_quoted_wildcard_is_expanded(tiny_run, sample_dir, tmp_path, capsys):
    # Windows shells (and a quoted argument anywhere) hand the pattern over as it is: predict said
    # "photos/*.jpg: no such file or folder"
    from imgclf.cli import main

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for i, c in enumerate(("cat", "ship")):
        shutil.copy(_photo(sample_dir, c), photos / f"{c}.jpg")
        shutil.copy(_photo(sample_dir, c, 1), photos / "more" / f"{c}{i}.jpg")
    (photos / "notes.txt").write_text("not a photo")
    assert main(["predict", str(tiny_run), str(photos / "*.jpg"), "--top-k", "1", "--device", "cpu"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split("\t")[0] for r in rows] == [str(photos / "cat.jpg"), str(photos / "ship.jpg")]
    res = imgclf.load(tiny_run, "cpu").predict(str(photos / "**" / "*.jpg"), top_k=1)
    assert len(res) == 4 and all("top" in r for r in res)
    assert main(["predict", str(tiny_run), str(photos / "*.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no file or folder matches this pattern" in err


def test_evaluate_a_zip_whose_utf8_class_folders_have_no_flag(tiny_run, sample_dir, tmp_path):
    # a model with a class 'félin', scored on a zip of its test photos made with Info-ZIP or
    # macOS: the folder came out 'f├⌐lin' and evaluate refused the data as an unknown class
    import json

    from imgclf.runs import read_meta

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["classes"] = ["félin" if c == "cat" else c for c in meta["classes"]]
    (run / "model.json").write_text(json.dumps(meta))
    assert read_meta(run)[1]["classes"][3] == "félin"
    zpath = tmp_path / "mine.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for folder, cls in (("félin", "cat"), ("ship", "ship")):
            for f in sorted((sample_dir / "test" / cls).glob("*.jpg"))[:6]:
                zf.writestr(_Unflagged(f"{folder}/{f.name}"), f.read_bytes())
    m = imgclf.evaluate(run, zpath, device="cpu", out=tmp_path / "eval", progress=False,
                        cache_dir=str(tmp_path / "cache"))
    support = {r["class"]: r["support"] for r in m["per_class"]}
    assert m["n"] == 12 and support["félin"] == 6 and support["ship"] == 6


def test_a_folder_of_formats_not_scanned_says_so(tiny_run, sample_dir, tmp_path, capsys):
    # a folder of JPEG 2000 scans or TGA textures: they were passed over without a word, and
    # predict said only 'no images in ...' (or gave quietly fewer rows beside other photos)
    from PIL import Image

    from imgclf.cli import main

    photos = tmp_path / "scans"
    photos.mkdir()
    shutil.copy(_photo(sample_dir), photos / "ok.jpg")
    with Image.open(_photo(sample_dir, "cat")) as im:
        im.save(photos / "texture.tga")
        im.save(photos / "favicon.ico")
    assert main(["predict", str(tiny_run), str(photos), "--top-k", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1
    note = [x for x in captured.err.splitlines() if ".tga" in x]
    assert len(note) == 1 and "1 .ico, 1 .tga file(s) skipped" in note[0] and "convert them" in note[0]
    # named one by one they are still read
    assert main(["predict", str(tiny_run), str(photos / "texture.tga"), "--top-k", "1", "--device", "cpu"]) == 0


def _stdin(monkeypatch, data: bytes) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_dash_reads_an_image_or_a_list_of_paths_from_stdin(tiny_run, sample_dir, tmp_path, capsys, monkeypatch):
    # `curl -s URL | imgclf predict RUN -` and `find shoot -name '*.jpg' | imgclf predict RUN -`
    # said "-: no such file or folder"
    from imgclf.cli import main

    photo = _photo(sample_dir)
    want = imgclf.load(tiny_run, "cpu").predict([photo], top_k=1)[0]["top"][0][0]
    _stdin(monkeypatch, photo.read_bytes())
    assert main(["predict", str(tiny_run), "-", "--top-k", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"<stdin>\t{want} ")
    other = _photo(sample_dir, "cat")
    _stdin(monkeypatch, f"{photo}\n{other}\r\n\n".encode())
    assert main(["predict", str(tiny_run), "-", "--top-k", "1", "--device", "cpu"]) == 0
    assert [r.split("\t")[0] for r in capsys.readouterr().out.splitlines()] == [str(photo), str(other)]
    _stdin(monkeypatch, _photo(sample_dir, "cat", 2).read_bytes())
    out = tmp_path / "cams"
    assert main(["explain", str(tiny_run), "-", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "stdin_gradcam.png").exists()
    _stdin(monkeypatch, b"")
    assert main(["predict", str(tiny_run), "-"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stdin was empty" in err


def test_a_broken_link_in_a_folder_is_reported_not_dropped(tiny_run, sample_dir, tmp_path, capsys):
    # a photo folder whose links point at a drive not mounted: predict listed the other photos and
    # dropped the link without a word (training reports such a file as unreadable)
    from imgclf.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(_photo(sample_dir), photos / "here.jpg")
    (photos / "away.jpg").symlink_to(tmp_path / "unmounted" / "away.jpg")
    assert main(["predict", str(tiny_run), str(photos), "--top-k", "1", "--device", "cpu"]) == 1
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and rows[0].startswith(f"{photos / 'away.jpg'}\tERROR a link to ")
    assert "does not exist" in rows[0] and "\tERROR" not in rows[1]
