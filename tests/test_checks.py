"""Data checks (issue 4): planted problems in a copy of the CIFAR-10 sample are each reported, and
nothing else is; duplicate search, layout score, JSON and grid, exit codes, the summary in train."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from imgclf.cli import main
from imgclf.data.checks import SCRAMBLED_BELOW, grid_size, neighbour_correlation, run_checks
from imgclf.data.phash import hamming, near_pairs, phash_batch


def _check(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main(["check", *argv, "--out", str(out), "--no-progress"])
    json_path = Path(argv[argv.index("--json") + 1]) if "--json" in argv else out / "check.json"
    return rc, json.loads(json_path.read_text())


def _kinds(report: dict) -> list[str]:
    return sorted(f["kind"] for f in report["findings"])


@pytest.fixture(scope="module")
def planted(small_sample, tmp_path_factory) -> Path:
    """small_sample (40 train / 10 test per class) with three planted problems."""
    root = tmp_path_factory.mktemp("planted") / "data"
    shutil.copytree(small_sample, root)
    # 1. a training image copied into test under another name: leakage
    shutil.copy(root / "train" / "airplane" / "0003.jpg", root / "test" / "airplane" / "leaked.jpg")
    # 2. a corrupt file: a JPEG cut in half
    data = (root / "train" / "bird" / "0000.jpg").read_bytes()
    (root / "train" / "bird" / "broken.jpg").write_bytes(data[: len(data) // 2])
    # 3. a class of 5 images
    for f in sorted((root / "train" / "cat").glob("*.jpg"))[5:]:
        f.unlink()
    return root


def test_clean_sample_has_no_findings(small_sample, tmp_path):
    # The full packaged sample holds one true CIFAR near-duplicate (train/frog/0178.jpg and
    # 0204.jpg, the same photo re-encoded); small_sample's first 40 images per class hold none.
    rc, report = _check(tmp_path, "--data", str(small_sample))
    assert rc == 0
    assert report["findings"] == [] and report["serious"] is False
    assert report["stats"]["duplicates"]["near_pairs"] == 0
    assert report["stats"]["duplicates"]["hashed"] == 500
    assert report["stats"]["images"]["sizes"] == {"32x32": report["stats"]["images"]["sampled"]}
    assert report["stats"]["layout"]["neighbour_correlation"] > 0.85
    grid = Path(report["grid"])
    with Image.open(grid) as im:
        assert im.size == grid_size(10)


def test_planted_problems_each_reported_and_nothing_else(planted, tmp_path):
    rc, report = _check(tmp_path, "--data", str(planted), "--json", str(tmp_path / "findings.json"))
    assert rc == 1 and not (tmp_path / "out" / "check.json").exists()  # --json moved it
    assert _kinds(report) == ["duplicate_across_splits", "few_images", "unreadable"], report["findings"]
    assert all(f["severity"] == "error" for f in report["findings"]) and report["serious"]
    by_kind = {f["kind"]: f for f in report["findings"]}
    leak = by_kind["duplicate_across_splits"]
    assert any(p.endswith("test/airplane/leaked.jpg") for p in leak["paths"])
    assert any(p.endswith("airplane/0003.jpg") for p in leak["paths"])
    assert by_kind["unreadable"]["paths"][0].endswith("train/bird/broken.jpg")
    assert "truncated" in by_kind["unreadable"]["details"]["reasons"][0]
    assert by_kind["few_images"]["details"]["class"] == "cat"
    assert "cat" in by_kind["few_images"]["message"]
    # each message says what to do about it
    assert "remove one image of each pair" in leak["message"]
    assert "re-export or delete them" in by_kind["unreadable"]["message"]
    assert "add images or remove the class" in by_kind["few_images"]["message"]
    for f in report["findings"]:
        assert set(f) >= {"kind", "severity", "message", "paths"} and f["message"]
    assert report["stats"]["counts"]["test"]["airplane"] == 11
    assert sum(report["stats"]["counts"][s]["cat"] for s in ("train", "val")) == 5


def _write_csv(path: Path, root: Path, layout: str) -> None:
    lines = ["label," + ",".join(f"p{i}" for i in range(3072))]
    for cdir in sorted((root / "train").iterdir()):
        for f in sorted(cdir.glob("*.jpg")):
            a = np.asarray(Image.open(f).convert("RGB"))
            px = a.transpose(2, 0, 1).reshape(-1) if layout == "planar" else a.reshape(-1)
            lines.append(cdir.name + "," + ",".join(map(str, px.tolist())))
    path.write_text("\n".join(lines) + "\n")


def test_csv_read_with_the_wrong_layout_is_flagged(small_sample, tmp_path):
    csv = tmp_path / "pixels.csv"
    _write_csv(csv, small_sample, "planar")
    rc, report = _check(tmp_path / "wrong", "--data", str(csv), "--csv-layout", "interleaved")
    assert rc == 1
    assert _kinds(report) == ["scrambled"]
    finding = report["findings"][0]
    assert finding["severity"] == "error" and "wrong --csv-layout" in finding["message"]
    assert finding["details"]["suggested_layout"] == "planar"
    assert report["stats"]["layout"]["neighbour_correlation"] < SCRAMBLED_BELOW
    # the same file read the right way is clean
    rc, report = _check(tmp_path / "right", "--data", str(csv), "--csv-layout", "planar")
    assert rc == 0 and report["findings"] == []
    assert report["stats"]["layout"]["neighbour_correlation"] > 0.85


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_exact_and_near_duplicates(sample_dir, tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 12), ("test", 3)):
        for c in ("airplane", "ship"):
            (root / split / c).mkdir(parents=True)
            for f in sorted((sample_dir / split / c).glob("*.jpg"))[:n]:
                shutil.copy(f, root / split / c / f.name)
    src = root / "train" / "ship" / "0001.jpg"
    shutil.copy(src, root / "train" / "ship" / "copy.jpg")  # exact, within train
    brighter = ImageEnhance.Brightness(Image.open(src).convert("RGB")).enhance(1.15)
    (root / "test" / "ship" / "brighter.jpg").write_bytes(_jpeg_bytes(brighter, 85))  # near, in test
    rc, report = _check(tmp_path, "--data", str(root), "--val-split", "0")
    assert rc == 1
    assert _kinds(report) == ["duplicate", "near_duplicate_across_splits"], report["findings"]
    by_kind = {f["kind"]: f for f in report["findings"]}
    assert by_kind["duplicate"]["severity"] == "warning"
    assert sorted(Path(p).name for p in by_kind["duplicate"]["paths"]) == ["0001.jpg", "copy.jpg"]
    near = by_kind["near_duplicate_across_splits"]
    assert near["severity"] == "error"
    assert {Path(p).name for p in near["paths"]} == {"0001.jpg", "copy.jpg", "brighter.jpg"}


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 2000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 2000, dtype=np.uint64)
    for i in range(0, 200, 2):  # plant close pairs at distances 0..6
        flips = rng.choice(64, rng.integers(0, 7), replace=False)
        h[i + 1] = h[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    h[1500:1800] = h[1500]  # one big bucket (near-constant images hash alike)
    for t in (0, 4, 6):
        found = {(int(a), int(b)) for a, b, _ in near_pairs(h, t)}
        d = np.bitwise_count(h[:, None] ^ h[None, :])
        ii, jj = np.nonzero(np.triu(d <= t, 1))
        assert found == set(zip(ii.tolist(), jj.tolist()))


def test_phash_is_robust_and_discriminative(sample_dir):
    files = sorted((sample_dir / "train" / "dog").glob("*.jpg"))[:50]
    imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    h = phash_batch(imgs)
    assert len(np.unique(h)) == 50
    d = hamming(h[:, None], h[None, :])[np.triu_indices(50, 1)]
    assert d.min() > 6 and 26 < d.mean() < 38
    # bigger images of the same content hash alike (block averaging + area resize)
    big = np.repeat(np.repeat(imgs, 7, axis=1), 7, axis=2)
    assert hamming(h, phash_batch(big)).max() <= 2


def test_neighbour_correlation_separates_scrambled(sample_dir):
    files = sorted((sample_dir / "test").glob("*/*.jpg"))[::5]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    n = len(x)
    planar_as_interleaved = x.transpose(0, 3, 1, 2).reshape(n, 32, 32, 3)
    interleaved_as_planar = x.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    assert neighbour_correlation(x) > 0.85
    assert neighbour_correlation(planar_as_interleaved) < 0.65
    assert neighbour_correlation(interleaved_as_planar) < 0.4


def test_run_checks_on_arrays_needs_no_files(sample_dir):
    from imgclf.data.cache import build_cache
    from imgclf.data.sources import DataSource, Split

    files = sorted((sample_dir / "train").glob("*/*.jpg"))[::10]
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    y = np.asarray([sorted(p.name for p in (sample_dir / "train").iterdir()).index(f.parent.name) for f in files])
    x[1] = x[0]
    src = DataSource("arr", "arrays", sorted(p.name for p in (sample_dir / "train").iterdir()),
                     Split(labels=y, images=x))
    cached = {"train": build_cache(src.train, 32, "stretch", Path("/nonexistent"))}
    report = run_checks(src, cached, grid=False)
    assert report.kinds() == ["duplicate"] and not report.serious
    assert report.findings[0].paths == ["train[0]", "train[1]"]
    assert y[0] == y[1] and "different labels" not in report.findings[0].message


def test_training_summary_is_short_and_writes_check_json(planted, tmp_path, capsys):
    from imgclf.data.cache import build_cache, cache_root
    from imgclf.data.checks import check_for_training
    from imgclf.data.sources import load_source

    root = cache_root()
    src = load_source(str(planted), cache_dir=root)
    cached = {n: build_cache(s, 32, "stretch", root / "images", progress=False) for n, s in src.splits().items()}
    report = check_for_training(src, cached, tmp_path)
    assert report is not None and report.serious  # reported, and nothing raised: training goes on
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "data check" in ln]
    # the counts with the worst finding, the other error train has not printed already (the
    # unreadable file was, as the source was read), then where the details are
    assert len(lines) == 3 and "3 errors" in lines[0] and "details in" in lines[-1]
    assert lines[1].startswith("imgclf: warning: data check: ") and "details" not in lines[1]
    assert _kinds(json.loads((tmp_path / "check.json").read_text())) == sorted(report.kinds())
    assert (tmp_path / "samples.png").exists()


def test_train_runs_the_check(tiny_run):
    # tiny_run: 2 epochs on the packaged sample, shared with the other tests
    report = json.loads((tiny_run / "check.json").read_text())
    assert report["serious"] is False
    # the sample's one true near-duplicate pair (train/frog/0178.jpg ~ 0204.jpg) stays within
    # train, and its one true mirrored pair (test/deer/0064.jpg ~ mirror of 0098.jpg, the same
    # photo flipped and recoloured) within test: nothing else in its 4,000 images
    assert _kinds(report) == ["near_duplicate", "near_duplicate"]
    near, mirrored = sorted(report["findings"], key=lambda f: bool(f["details"].get("mirrored")))

    def names(f):
        return sorted(p.rsplit("/", 2)[-2] + "/" + p.rsplit("/", 1)[-1] for p in f["paths"])

    assert names(near) == ["frog/0178.jpg", "frog/0204.jpg"] and near["details"]["splits"] == ["train", "train"]
    assert names(mirrored) == ["deer/0064.jpg", "deer/0098.jpg"] and mirrored["details"]["splits"] == ["test", "test"]
    assert "mirrored copies" in mirrored["message"]
    assert (tiny_run / "samples.png").exists()


def test_printed_report_shows_names_with_brackets_as_written(capsys):
    # file and class names are the user's text: "[/x]" used to raise rich's MarkupError and
    # "[bold]" vanished into styling
    from imgclf.data.checks import CheckReport, Finding
    from imgclf.data.commands import print_report

    report = CheckReport(data="shots [2024]/[bold]", classes=["a", "b"], image_size=32, findings=[
        Finding("duplicate", "warning", "train/[/x]/img[1].jpg and train/b/[bold]copy.jpg are the same picture")])
    print_report(report, {"train": [0] * 4})
    out = capsys.readouterr().out
    assert "shots [2024]/[bold]" in out
    flat = "".join(out.split())  # the table folds long findings over lines
    assert "train/[/x]/img[1].jpg" in flat and "train/b/[bold]copy.jpg" in flat


def _grid_of(sample_dir, classes: list[str], tmp_path: Path, per_class: int = 2) -> Image.Image:
    from imgclf.data.cache import build_cache
    from imgclf.data.checks import write_sample_grid
    from imgclf.data.sources import DataSource, Split

    files = sorted((sample_dir / "train" / "ship").glob("*.jpg"))[:per_class]
    one = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    x = np.concatenate([one] * len(classes))
    y = np.repeat(np.arange(len(classes)), per_class)
    src = DataSource("arr", "arrays", classes, Split(labels=y, images=x))
    cs = build_cache(src.train, 32, "stretch", Path("/nonexistent"))
    return Image.open(write_sample_grid(cs, classes, tmp_path / "samples.png"))


def test_grid_labels_tell_long_and_accented_names_apart(sample_dir, tmp_path):
    # names were cut to 16 letters ("plant_disease_le" on every row) and drawn with PIL's
    # built-in font, which shows é and è as the same box
    from imgclf.data.checks import GRID_CELL, GRID_LABEL_W, GRID_PAD

    classes = ["plant_disease_leaf_spot_early", "plant_disease_leaf_spot_late", "café", "cafè"]
    grid = np.asarray(_grid_of(sample_dir, classes, tmp_path).convert("L"))
    labels = [grid[GRID_PAD + r * (GRID_CELL + GRID_PAD):][:GRID_CELL, :GRID_LABEL_W] for r in range(4)]
    assert all((lab < 128).any() for lab in labels)
    assert not np.array_equal(labels[0], labels[1])
    assert not np.array_equal(labels[2], labels[3])


def test_grid_says_which_classes_it_leaves_out(sample_dir, tmp_path):
    from imgclf.data.checks import GRID_CELL, GRID_MAX_ROWS, GRID_PAD

    n = GRID_MAX_ROWS + 3
    grid = _grid_of(sample_dir, [f"class {i}" for i in range(n)], tmp_path, per_class=1)
    assert grid.size == grid_size(n)
    rows_end = GRID_MAX_ROWS * (GRID_CELL + GRID_PAD) + GRID_PAD
    assert grid.size[1] > rows_end  # room for the note under the last row
    footer = np.asarray(grid.convert("L"))[rows_end:]
    assert (footer < 128).any()  # "... and 3 more classes, not shown"
    assert grid_size(10)[1] == 10 * (GRID_CELL + GRID_PAD) + GRID_PAD  # no note when every class fits


def test_check_reads_a_training_config_whole(small_sample, tmp_path, capsys):
    # check --config read only the data options, so a typo elsewhere in the file passed the check
    # and stopped 'train' later
    bad = tmp_path / "run.yaml"
    bad.write_text(f"data: {small_sample}\nepochz: 3\n")
    assert main(["check", "--config", str(bad), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "unknown option 'epochz'; did you mean 'epochs'?" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 3\nval_split: 0.2\n")  # the data given on the command line
    rc, report = _check(tmp_path, "--config", str(good), "--data", str(small_sample))
    assert rc == 0 and sum(report["stats"]["counts"]["train"].values()) == 320  # the file's val_split 0.2


# -- findings a tester missed or got wrong ----------------------------------------------------


def _classes(sample_dir: Path, root: Path, names: dict[str, str], n: int = 20) -> Path:
    """root/<folder>/ with the first n training JPEGs of each sample class; names: folder -> class."""
    for folder, c in names.items():
        (root / folder).mkdir(parents=True)
        for f in sorted((sample_dir / "train" / c).glob("*.jpg"))[:n]:
            shutil.copy(f, root / folder / f.name)
    return root


def test_label_conflicts_are_named_first_with_both_labels_and_are_serious(sample_dir, tmp_path):
    # the example was a same-label pair and the mislabelled one was never named; a warning, exit 0
    root = _classes(sample_dir, tmp_path / "data", {"cat": "cat", "dog": "dog"})
    shutil.copy(root / "cat" / "0000.jpg", root / "cat" / "0000_copy.jpg")
    shutil.copy(root / "cat" / "0001.jpg", root / "cat" / "0001_copy.jpg")
    shutil.copy(root / "cat" / "0002.jpg", root / "dog" / "zz_from_cat.jpg")
    rc, report = _check(tmp_path, "--data", str(root), "--val-split", "0")
    assert rc == 1 and _kinds(report) == ["duplicate"], report["findings"]
    dup = report["findings"][0]
    assert dup["severity"] == "error" and dup["details"]["label_conflicts"] == 1
    msg = dup["message"]
    assert "1 with different labels, fix the wrong label: dog/zz_from_cat.jpg (dog) = cat/0002.jpg (cat)" in msg
    assert "2 with the same label, e.g. cat/0000_copy.jpg = cat/0000.jpg" in msg
    assert msg.index("zz_from_cat") < msg.index("0000_copy")
    assert [Path(p).name for p in dup["details"]["pairs"][0]] == ["0002.jpg", "zz_from_cat.jpg"]
    # several conflicts: each named, with its labels
    shutil.copy(root / "dog" / "0003.jpg", root / "cat" / "from_dog.jpg")
    rc, report = _check(tmp_path / "b", "--data", str(root), "--val-split", "0")
    msg = report["findings"][0]["message"]
    assert "2 with different labels" in msg and "dog/0003.jpg (dog) = cat/from_dog.jpg (cat)" in msg
    assert "dog/zz_from_cat.jpg (dog) = cat/0002.jpg (cat)" in msg


def test_one_class_is_serious_as_train_refuses_it(sample_dir, tmp_path):
    # "1 classes ... no problems found", exit 0, for data that train refuses
    for root in (_classes(sample_dir, tmp_path / "one", {"cat": "cat"}),
                 _classes(sample_dir, tmp_path / "wrapped", {"photos/cat": "cat"})):
        rc, report = _check(tmp_path / root.name, "--data", str(root), "--val-split", "0")
        assert rc == 1 and _kinds(report) == ["one_class"], report["findings"]
        msg = report["findings"][0]["message"]
        assert msg.startswith("only one class (cat) in ") and report["findings"][0]["severity"] == "error"
        assert "a classifier needs two or more: point --data at the folder that holds the class folders" in msg
    # a label CSV whose other class's rows say nan: no folder level to point at
    table = tmp_path / "labels.csv"
    cats = sorted((sample_dir / "train" / "cat").glob("*.jpg"))[:12]
    dogs = sorted((sample_dir / "train" / "dog").glob("*.jpg"))[:12]
    table.write_text("path,label\n" + "".join(f"{f},cat\n" for f in cats) + "".join(f"{f},nan\n" for f in dogs))
    rc, report = _check(tmp_path / "csv", "--data", str(table), "--val-split", "0")
    one = next(f for f in report["findings"] if f["kind"] == "one_class")
    assert rc == 1 and "its labels name one class" in one["message"] and "class folders" not in one["message"]


def test_val_data_inside_the_training_data_is_said_to_be_the_same_files(sample_dir, tmp_path):
    # --val-data D/train was reported as 120 copies, "e.g. train/cat/0000.jpg = train/cat/0000.jpg"
    root = tmp_path / "data"
    _classes(sample_dir, root / "train", {"cat": "cat", "dog": "dog"}, 15)
    _classes(sample_dir, root / "test", {"cat": "cat", "dog": "dog"}, 0)
    for f in sorted((sample_dir / "test" / "cat").glob("*.jpg"))[:5]:
        shutil.copy(f, root / "test" / "cat" / f.name)
    for f in sorted((sample_dir / "test" / "dog").glob("*.jpg"))[:5]:
        shutil.copy(f, root / "test" / "dog" / f.name)
    shutil.copy(root / "train" / "cat" / "0000.jpg", root / "test" / "cat" / "leak.jpg")  # a real copy
    shutil.copy(root / "train" / "dog" / "0001.jpg", root / "train" / "dog" / "copy.jpg")  # a copy within train
    rc, report = _check(tmp_path, "--data", str(root), "--val-data", str(root / "train"))
    assert rc == 1
    assert _kinds(report) == ["duplicate", "duplicate_across_splits", "same_files_across_splits"], report["findings"]
    by_kind = {f["kind"]: f for f in report["findings"]}
    same = by_kind["same_files_across_splits"]
    assert same["severity"] == "error" and same["details"]["splits"] == ["train", "val"]
    assert f"val data {root / 'train'} is (part of) the train data: the same files are in both (31 of 31" in same["message"]
    assert "point --val-data at images" in same["message"] and "copies" not in same["message"]
    # the real copies are still copies: the leak into test, and the copy within train (once, not
    # again as a val image "copied" from train)
    leak = by_kind["duplicate_across_splits"]
    assert leak["details"]["splits"] == ["train", "test"] and "test/cat/leak.jpg = train/cat/0000.jpg" in leak["message"]
    assert by_kind["duplicate"]["details"]["splits"] == ["train", "train"]


def test_tiny_images_readable_counts_path_spelling_and_quoted_class_names(sample_dir, tmp_path, monkeypatch):
    root = _classes(sample_dir, tmp_path / "data", {"cat ": "cat", "dog": "dog"})
    for side, name in ((1, "one.jpg"), (8, "eight.jpg")):
        Image.open(sample_dir / "train" / "cat" / "0100.jpg").resize((side, side)).save(root / "dog" / name)
    data = (root / "dog" / "0005.jpg").read_bytes()
    (root / "dog" / "broken.jpg").write_bytes(data[: len(data) * 4 // 5])  # its header reads, its pixels do not
    shutil.copy(root / "cat " / "0003.jpg", root / "dog" / "from_cat.jpg")
    monkeypatch.chdir(tmp_path)
    messages = []
    for spelling in (str(root), "data"):  # the second run reuses the first's decoded cache
        rc, report = _check(tmp_path / f"run{len(messages)}", "--data", spelling, "--val-split", "0")
        by_kind = {f["kind"]: f for f in report["findings"]}
        assert sorted(by_kind) == ["duplicate", "tiny", "unreadable"], report["findings"]
        messages.append(by_kind["unreadable"]["message"])
        assert by_kind["unreadable"]["details"]["reasons"] == ["truncated or corrupt image data"]
        tiny = by_kind["tiny"]
        assert tiny["severity"] == "warning" and tiny["details"]["count"] == 2
        assert "2 image(s) are far smaller than the 32px input" in tiny["message"]
        assert "e.g. dog/one.jpg, 1x1" in tiny["message"]
        assert report["stats"]["images"]["sampled"] == sum(report["stats"]["counts"]["train"].values()) == 43
        assert "dog/from_cat.jpg (dog) = cat /0003.jpg ('cat ')" in by_kind["duplicate"]["message"]
    # the path as this run names it, relative to --data, however the cache's first run spelt it
    assert messages[0] == messages[1]
    assert "skipped in training: dog/broken.jpg: truncated or corrupt image data;" in messages[0]


def test_the_size_train_picks_follows_the_median_the_check_reports(tmp_path):
    """Photos of many sizes: train's automatic --image-size is the check's median short side,
    rounded to 16 px (it sampled 256 headers where the check reads 2000, and on mixed photos
    chose 176 px while the check said 160)."""
    from imgclf.engine.recipe import auto_image_size

    rng = np.random.default_rng(0)  # a median short side of 184 px: 256 headers gave 176, all of them 192
    paths = []
    for i, side in enumerate(rng.integers(100, 261, 1201)):
        d = tmp_path / "photos" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{i:04d}.png"
        Image.new("RGB", (int(side) + int(rng.integers(0, 80)), int(side)), (i % 255, 90, 30)).save(p, compress_level=0)
        paths.append(str(p))
    assert main(["check", str(tmp_path / "photos"), "--out", str(tmp_path / "chk"), "--max-images", "10"]) in (0, 1)
    median = json.loads((tmp_path / "chk" / "check.json").read_text())["stats"]["images"]["short_side"]["median"]
    assert auto_image_size(sorted(paths), None) == 16 * round(median / 16)


def test_a_pretrained_run_is_not_told_to_train_at_the_photos_own_size(few, tmp_path, capsys):
    # 32-px photos at Lite0's input: the check advised '--image-size 32', where a pretrained
    # backbone's features are left a 1x1 map; upscaling to the model's size is the point there
    import json

    import imgclf

    res = imgclf.train(data=str(few), model="efficientnet_lite0", pretrained=True, image_size=96, epochs=0.1,
                       project=str(tmp_path), name="lite", progress=False, tensorboard=False, tta=False)
    err = capsys.readouterr().err
    found = {f["kind"]: f for f in json.loads((res.run_dir / "check.json").read_text())["findings"]}
    assert found["upscaled"]["severity"] == "info"
    assert "to the pretrained model's input size, as its features expect" in found["upscaled"]["message"]
    assert "--image-size 32" not in err and "--image-size 32" not in found["upscaled"]["message"]
    # from scratch, the same photos at 96 px are blown up for nothing: the advice stands
    res = imgclf.train(data=str(few), image_size=96, epochs=0.1, project=str(tmp_path), name="scratch",
                       progress=False, tensorboard=False, tta=False)
    found = {f["kind"]: f for f in json.loads((res.run_dir / "check.json").read_text())["findings"]}
    assert found["upscaled"]["severity"] == "warning" and "consider --image-size 32" in found["upscaled"]["message"]
