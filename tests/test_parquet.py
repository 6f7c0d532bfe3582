"""--data a Hugging Face data set as parquet shards: written out once into the cache as folders,
then read as any folder. Built from the packaged CIFAR-10 sample's real JPEGs, with the schema
metadata the `datasets` library writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa  # the [parquet] extra, which [dev] installs: missing, these tests fail, not skip
import pyarrow.parquet as pq
import pytest

from imgclf.data.sources import load_source
from imgclf.errors import UserError

NAMES = ["airplane", "automobile", "bird", "cat"]


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _shard(sample: Path, split: str, n: int, *, multi: bool = False, unlabelled: int = 0, hf: bool = True,
           truth: dict | None = None):
    """A table as the `datasets` library writes one: an Image column (struct of bytes and path)
    and a ClassLabel (or a list of them) with the names in the schema's huggingface metadata."""
    imgs, ys, coarse = [], [], []
    for i, c in enumerate(NAMES):
        for f in sorted((sample / split / c).glob("*.jpg"))[:n]:
            data = f.read_bytes()
            imgs.append({"bytes": data, "path": f.name})
            ys.append([i, (i + 1) % 4] if multi else i)
            coarse.append("vehicle" if c in ("airplane", "automobile") else "animal")
            if truth is not None:
                truth[_digest(data)] = ys[-1]
    for f in sorted((sample / split / "dog").glob("*.jpg"))[:unlabelled]:  # a test split's -1 rows
        imgs.append({"bytes": f.read_bytes(), "path": f.name})
        ys.append([] if multi else -1)
        coarse.append("animal")
    label = {"names": NAMES, "_type": "ClassLabel"}
    feats = {"img": {"_type": "Image"}, "label": {"feature": label, "_type": "Sequence"} if multi else label,
             "coarse": {"dtype": "string", "_type": "Value"}}
    t = pa.table({"img": imgs, "label": ys, "coarse": coarse})
    return t.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": feats}})}) if hf else t


def _hub_snapshot(sample: Path, root: Path, truth: dict, **kw) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    pq.write_table(_shard(sample, "train", 10, truth=truth, **kw), root / "data" / "train-00000-of-00001.parquet")
    pq.write_table(_shard(sample, "test", 5, unlabelled=3, truth=truth, **kw),
                   root / "data" / "test-00000-of-00001.parquet")
    return root


def _labels_by_digest(split) -> dict:
    out = {}
    for p, y in zip(split.paths, split.labels):
        out[_digest(Path(p).read_bytes())] = np.flatnonzero(y).tolist() if np.ndim(y) else int(y)
    return out


def test_a_hub_snapshot_trains_as_its_splits_with_its_class_names(sample_dir, tmp_path, capfd):
    truth: dict = {}
    root = _hub_snapshot(sample_dir, tmp_path / "cifar-hf", truth)
    src = load_source(str(root), val_split=0.1, cache_dir=tmp_path / "cache")
    assert src.classes == NAMES and src.task == "single" and src.name == "cifar-hf"
    assert len(src.train) + len(src.val) == 40 and len(src.test) == 20  # the 3 unlabelled rows skipped
    for split in (src.train, src.val, src.test):  # every image under the label its row gave it
        for digest, y in _labels_by_digest(split).items():
            assert truth[digest] == y
    err = capfd.readouterr().err
    assert "extracting" in err and "3 row(s) without a label" in err and "4 class names" in err

    # written out once: a second read reuses the folder; a changed shard is written out again
    again = load_source(str(root), val_split=0.1, cache_dir=tmp_path / "cache")
    assert again.train.paths == src.train.paths and "extracting" not in capfd.readouterr().err
    shard = root / "data" / "test-00000-of-00001.parquet"
    os.utime(shard, (shard.stat().st_atime, shard.stat().st_mtime + 5))
    load_source(str(root), val_split=0.1, cache_dir=tmp_path / "cache")
    assert "extracting" in capfd.readouterr().err


def test_one_file_another_label_column_and_tables_without_metadata(sample_dir, tmp_path):
    truth: dict = {}
    pq.write_table(_shard(sample_dir, "train", 6, hf=False, truth=truth), tmp_path / "plain.parquet")
    # no Hugging Face metadata: 'label' by its name, the class names are its values
    src = load_source(str(tmp_path / "plain.parquet"), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == ["0", "1", "2", "3"] and len(src.train) == 24
    coarse = load_source(str(tmp_path / "plain.parquet"), val_split=0, cache_dir=tmp_path / "cache",
                         label_column="coarse")
    assert coarse.classes == ["animal", "vehicle"]
    assert np.bincount(coarse.train.labels).tolist() == [12, 12]
    with pytest.raises(UserError, match="--label-column corse: no such column"):
        load_source(str(tmp_path / "plain.parquet"), val_split=0, cache_dir=tmp_path / "cache", label_column="corse")


def test_lists_of_labels_are_multi_label(sample_dir, tmp_path):
    truth: dict = {}
    root = _hub_snapshot(sample_dir, tmp_path / "ml", truth, multi=True)
    src = load_source(str(root), val_split=0, cache_dir=tmp_path / "cache")
    assert src.task == "multilabel" and src.classes == sorted(NAMES)
    order = [NAMES.index(c) for c in src.classes]  # label CSVs list classes by name
    for digest, got in _labels_by_digest(src.train).items():
        assert sorted(order[k] for k in got) == sorted(truth[digest])
    assert len(src.test) == 23 and (src.test.labels.sum(1) == 0).sum() == 3  # unlabelled: all-negative


def test_class_indices_follow_the_data_sets_class_label_order(sample_dir, tmp_path):
    """Class i is the data set's ClassLabel i (as on the Hub, in papers, in the user's own
    code), not the i-th name A-Z; single- and multi-label alike."""
    names = ["truck", "cat", "airplane", "bird"]  # not in A-Z order
    feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    imgs, ys, truth = [], [], {}
    for i, c in enumerate(names):
        for f in sorted((sample_dir / "train" / c).glob("*.jpg"))[:5]:
            imgs.append({"bytes": f.read_bytes(), "path": None})
            ys.append(i)
            truth[_digest(imgs[-1]["bytes"])] = i
    meta = {b"huggingface": json.dumps({"info": {"features": feats}})}
    pq.write_table(pa.table({"image": imgs, "label": ys}).replace_schema_metadata(meta), tmp_path / "train.parquet")
    src = load_source(str(tmp_path / "train.parquet"), val_split=0, cache_dir=tmp_path / "cache")
    assert src.classes == names
    assert _labels_by_digest(src.train) == truth
    # the model is trained in that order: evaluate reads the file again in the model's order
    again = load_source(str(tmp_path / "train.parquet"), val_split=0, cache_dir=tmp_path / "cache",
                        classes=names)
    assert again.classes == names and _labels_by_digest(again.train) == truth

    multi = {"image": {"_type": "Image"}, "label": {"feature": feats["label"], "_type": "Sequence"}}
    lists = [[y, (y + 1) % 4] for y in ys]
    pq.write_table(pa.table({"image": imgs, "label": lists}).replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": multi}})}), tmp_path / "ml.parquet")
    ml = load_source(str(tmp_path / "ml.parquet"), val_split=0, cache_dir=tmp_path / "cache")
    assert ml.task == "multilabel" and ml.classes == names
    for digest, got in _labels_by_digest(ml.train).items():
        assert got == sorted([truth[digest], (truth[digest] + 1) % 4])


def test_rows_that_name_their_image_by_path_read_that_file(sample_dir, tmp_path, capfd):
    """datasets' to_parquet of images loaded from files keeps their paths, not their bytes: the
    file is read where the path says, below the parquet's folder (relative, or the last parts of
    a path from another machine); a row naming no image file is skipped and counted."""
    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    files = []
    for c in ("cat", "dog"):
        for f in sorted((sample_dir / "train" / c).glob("*.jpg"))[:3]:
            files.append(root / "images" / f"{c}-{f.name}")
            shutil.copy(f, files[-1])
    (root / "notes.txt").write_text("not an image")
    paths = [f"images/{files[0].name}", f"/home/someone/set/images/{files[1].name}",
             f"C:\\data\\set\\images\\{files[2].name}", str(files[3]),
             f"images/{files[4].name}", f"images/{files[5].name}", "notes.txt", "images/gone.jpg"]
    cells = [{"bytes": None, "path": p} for p in paths]
    cells[5] = {"bytes": files[5].read_bytes(), "path": "elsewhere/x.jpg"}  # bytes win over the path
    labels = [0, 0, 0, 1, 1, 1, 0, 1]
    feats = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    pq.write_table(pa.table({"image": cells, "label": labels}).replace_schema_metadata(
        {b"huggingface": json.dumps({"info": {"features": feats}})}), root / "train.parquet")
    src = load_source(str(root / "train.parquet"), val_split=0, cache_dir=tmp_path / "cache")
    got = _labels_by_digest(src.train)
    assert got == {_digest(f.read_bytes()): int(i >= 3) for i, f in enumerate(files)}
    err = capfd.readouterr().err
    assert "2 row(s) without image bytes or an image file at the path they name" in err
    assert "5 image(s) read from the files their rows name" in err
    # predict reads such rows the same way
    from imgclf.data.parquet import iter_images

    rows = list(iter_images(root / "train.parquet"))
    assert [d == f.read_bytes() for (_, d, _), f in zip(rows, files)] == [True] * 6
    assert [e for _, _, e in rows[6:]] == ["no image bytes in this row, nor a file at its path"] * 2


def test_damaged_or_foreign_parquet_files(sample_dir, tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(300))
    with pytest.raises(UserError, match="not a readable parquet file") as e:
        load_source(str(bad), val_split=0, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / "archives").glob(".extract-*"))  # nothing half-written kept
    pq.write_table(pa.table({"x": [1, 2], "label": [0, 1]}), tmp_path / "numbers.parquet")
    with pytest.raises(UserError, match="no image column"):
        load_source(str(tmp_path / "numbers.parquet"), val_split=0, cache_dir=tmp_path / "cache")
    # class folders beside a metadata parquet stay class folders
    tree = tmp_path / "tree"
    for c in ("cat", "dog"):
        shutil.copytree(sample_dir / "train" / c, tree / c)
    pq.write_table(pa.table({"x": [1]}), tree / "meta.parquet")
    assert load_source(str(tree), val_split=0, cache_dir=tmp_path / "cache").classes == ["cat", "dog"]


def test_train_and_evaluate_read_the_same_parquet(sample_dir, tmp_path):
    import imgclf

    root = _hub_snapshot(sample_dir, tmp_path / "hub", {})
    res = imgclf.train(data=str(root), epochs=1, project=str(tmp_path / "runs"), progress=False, tensorboard=False,
                       cache_dir=str(tmp_path / "cache"))
    assert res.test["n"] == 20
    again = imgclf.evaluate(res.run_dir, data=str(root))
    assert again["n"] == 20


# -- hf:OWNER/NAME: the download, against a local stand-in for the Hub ------------------------


@pytest.fixture
def hub(sample_dir, tmp_path, monkeypatch):
    """A local HTTP server answering as the Hub does: /api/datasets/<repo>/parquet lists each
    configuration's splits by URL, the files are served below it. Records the requests."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = tmp_path / "site"
    seen: list[tuple[str, str | None]] = []

    class Hub(SimpleHTTPRequestHandler):
        def do_GET(self):
            seen.append((f"{self.headers.get('Host')}{self.path}", self.headers.get("Authorization")))
            if self.path.startswith("/redirect/"):  # as the Hub sends its files to a CDN host
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/"
                                             f"{self.path.removeprefix('/redirect/')}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path.startswith("/api/datasets/") and self.path.endswith("/parquet"):
                f = site / self.path.lstrip("/") / "listing.json"
                if not f.is_file():
                    self.send_error(404, "Repository not found")
                    return
                body = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Hub, directory=str(site)))
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    repo = site / "api" / "datasets" / "someone" / "tiny-cifar" / "parquet"
    listing = {}
    for config, n in (("default", 6), ("small", 2)):
        listing[config] = {}
        for split, source, k in (("train", "train", n), ("validation", "test", 2)):
            (repo / config / split).mkdir(parents=True)
            pq.write_table(_shard(sample_dir, source, k), repo / config / split / "0.parquet")
            via = "/redirect" if config == "small" else ""
            listing[config][split] = [f"{base}{via}/api/datasets/someone/tiny-cifar/parquet/{config}/{split}/0.parquet"]
    (repo / "listing.json").write_text(json.dumps(listing))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    yield httpd, seen
    httpd.shutdown()
    httpd.server_close()


def test_a_hub_data_set_is_downloaded_once_and_read_offline_after(hub, tmp_path, capfd):
    httpd, seen = hub
    cache = tmp_path / "cache"
    src = load_source("hf:someone/tiny-cifar", val_split=0.1, cache_dir=cache)
    assert src.classes == NAMES and src.name == "tiny-cifar" and src.origin == "hf:someone/tiny-cifar"
    assert len(src.train) == 24 and len(src.val) == 8  # the Hub's validation split, not a hold-out
    assert "configurations default, small; reading 'default'" in capfd.readouterr().err
    assert all(auth == "Bearer hf_secret" for _, auth in seen)  # the token goes to the Hub
    folder = cache / "datasets" / "hf" / "someone--tiny-cifar" / "default"
    assert sorted(p.name for p in folder.iterdir()) == ["complete.json", "train-00000.parquet",
                                                         "validation-00000.parquet"]
    small = load_source("hf:someone/tiny-cifar:small", val_split=0.1, cache_dir=cache)
    assert len(small.train) == 8
    from imgclf.data.cache_admin import entries  # imgclf cache lists them, as downloads

    assert {e.what for e in entries(cache) if e.kind == "download"} == {
        "downloaded hf:someone/tiny-cifar:default", "downloaded hf:someone/tiny-cifar:small"}
    # the token goes to the Hub's host only, not where its files redirect to
    cdn = [auth for where, auth in seen if where.startswith("localhost")]
    assert len(cdn) == 2 and cdn == [None, None]
    assert all(auth == "Bearer hf_secret" for where, auth in seen if where.startswith("127.0.0.1"))

    httpd.shutdown()  # offline from here: what was downloaded is read without the network
    httpd.server_close()
    again = load_source("hf:someone/tiny-cifar:default", val_split=0.1, cache_dir=cache)
    assert again.train.paths == src.train.paths
    with pytest.raises(UserError, match=r"cannot reach http://127.0.0.1:\d+ .*offline\?"):
        load_source("hf:someone/other", val_split=0.1, cache_dir=cache)


def test_hub_names_that_do_not_exist_are_one_line(hub, tmp_path):
    for spec, match in (("hf:someone/missing", "no such data set on the Hub"),
                        ("hf:someone/tiny-cifar:large", "no configuration 'large'; it has default, small"),
                        ("hf:../../etc", "not a Hub data set name")):
        with pytest.raises(UserError, match=match) as e:
            load_source(spec, val_split=0.1, cache_dir=tmp_path / "cache")
        assert "\n" not in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_without_pyarrow_the_error_names_the_extra_before_any_download(sample_dir, tmp_path, monkeypatch):
    import sys

    pq.write_table(_shard(sample_dir, "train", 2), tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a download would say so
    for spec in (str(tmp_path / "t.parquet"), "hf:someone/tiny"):
        with pytest.raises(UserError, match=r"reading parquet data sets needs pyarrow: pip install 'imgclf\[parquet\]'"):
            load_source(spec, val_split=0, cache_dir=tmp_path / "cache")


def test_predict_reads_each_rows_image_in_place(tiny_run, sample_dir, tmp_path):
    import imgclf

    pq.write_table(_shard(sample_dir, "test", 3), tmp_path / "test-00000.parquet")
    files = [f for c in NAMES for f in sorted((sample_dir / "test" / c).glob("*.jpg"))[:3]]
    clf = imgclf.load(tiny_run)
    rows = clf.predict([str(tmp_path / "test-00000.parquet")], top_k=3)
    assert [r["input"] for r in rows] == [f"{tmp_path / 'test-00000.parquet'}#{i}" for i in range(12)]
    direct = clf.predict([str(f) for f in files], top_k=3)
    assert [[c for c, _ in r["top"]] for r in rows] == [[c for c, _ in r["top"]] for r in direct]
    np.testing.assert_allclose(clf.predict_proba([str(tmp_path / "test-00000.parquet")]),
                               clf.predict_proba([str(f) for f in files]), atol=1e-6)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + os.urandom(100))
    bad = clf.predict([str(tmp_path / "bad.parquet")])
    assert len(bad) == 1 and "not a readable parquet file" in bad[0]["error"]


def test_explain_names_each_rows_picture_by_its_row(tiny_run, sample_dir, tmp_path):
    from imgclf.evaluate.explain import explain

    pq.write_table(_shard(sample_dir, "test", 1), tmp_path / "test-00000.parquet")
    out = explain(tiny_run, [str(tmp_path / "test-00000.parquet")], out=tmp_path / "cams")
    assert [Path(r["output"]).name for r in out] == [f"test-00000_row{i}_gradcam.png" for i in range(4)]
