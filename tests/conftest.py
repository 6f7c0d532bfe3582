"""Shared fixtures: real data only (the packaged CIFAR-10 sample and the shared data sets)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
# tarfile's "data" filter where Python has it (3.11.4+); the shared archives are our own
SAFE_TAR = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
_EXTRACTED: list[str] = []
CIFAR_SLICE = 300  # images per class and split extracted for the tests (NNNN.jpg with NNNN < 300)


def pytest_configure(config):
    """Extract the shared CIFAR-10 and coco128 tarballs once per session into IMGCLF_TEST_DATA
    (train/, test/, coco128/), which test_images.py and test_arrays.py read at import. A folder
    the user already points IMGCLF_TEST_DATA at is used as it is."""
    if os.environ.get("IMGCLF_TEST_DATA"):
        return
    import tempfile

    dest = Path(tempfile.mkdtemp(prefix="imgclf-test-data-"))
    for name in ("cifar10-jpeg", "coco128"):
        tar = SHARED / f"{name}.tar.gz"
        if tar.exists():
            with tarfile.open(tar, "r|gz") as t:
                for m in t:
                    # the tests read a slice of CIFAR-10: 300 images per class and split, as many as
                    # the packaged sample has; writing all 60,000 files cost ~15 s of every run
                    stem = Path(m.name).stem
                    if name == "cifar10-jpeg" and m.isfile() and (not stem.isdigit() or int(stem) >= CIFAR_SLICE):
                        continue
                    t.extract(m, dest, **SAFE_TAR)
    if not (dest / "train").is_dir():
        # no shared data beside this clone: the CIFAR-10 JPEGs shipped in the package (300 per
        # class) are enough for every CIFAR test; only the COCO photos are then missing
        sample = REPO / "src" / "imgclf" / "sample" / "cifar10"
        for split in ("train", "test"):
            (dest / split).symlink_to(sample / split, target_is_directory=True)
    os.environ["IMGCLF_TEST_DATA"] = str(dest)
    _EXTRACTED.append(str(dest))


def pytest_unconfigure(config):
    for d in _EXTRACTED:
        shutil.rmtree(d, ignore_errors=True)
        os.environ.pop("IMGCLF_TEST_DATA", None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One cache per test session: tests never touch the user's ~/.cache, and decoding is shared.
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    from imgclf.sample import sample_dir

    return sample_dir()


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory, sample_dir) -> Path:
    """A copy of 40 train / 10 test images per class: small enough for seconds-long runs."""
    out = tmp_path_factory.mktemp("small")
    for split, n in (("train", 40), ("test", 10)):
        for cdir in sorted((sample_dir / split).iterdir()):
            dst = out / split / cdir.name
            dst.mkdir(parents=True)
            for f in sorted(cdir.glob("*.jpg"))[:n]:
                shutil.copy(f, dst / f.name)
    return out


# One training step of the small sample's default run (FastNet, 32 px, batch 32, Muon, auto
# precision) on the machine the time-limit tests' budgets were set on: 2 cores, AVX-512, ~770 img/s
# on the CIFAR-10 benchmark. Estimated from that benchmark's ratio to a 2-core AVX2-only Zen 3
# (179 img/s, 4.3x slower), where this step takes 0.26-0.29 s.
REFERENCE_STEP_S = 0.065


@pytest.fixture(scope="session")
def few(tmp_path_factory, sample_dir) -> Path:
    """3 classes x 16 photos of the packaged sample, plus 4 each for validation: a fine-tune in seconds."""
    out = tmp_path_factory.mktemp("few")
    for split, src, n in (("train", "train", 16), ("val", "test", 4)):
        for c in ("airplane", "cat", "ship"):
            (out / split / c).mkdir(parents=True)
            for f in sorted((sample_dir / src / c).glob("*.jpg"))[:n]:
                os.symlink(f, out / split / c / f.name)
    return out


@pytest.fixture(scope="session")
def slowness() -> float:
    """How many times slower than the reference machine this one trains (at least 1, at most 8):
    the time-limit tests scale their budgets by it, so a slow CPU still gets the epochs whose
    planning they test instead of failing for want of them; faster machines keep the budgets."""
    from types import SimpleNamespace

    import torch

    from imgclf.api import _fastnet_step_seconds
    from imgclf.config import TrainConfig
    from imgclf.engine import recipe
    from imgclf.engine.trainer import resolve_precision

    cfg = recipe.resolve(TrainConfig(data="x"), n_train=360, image_size=32, arch="fastnet")
    cpu = torch.device("cpu")
    s = SimpleNamespace(cfg=cfg, size=32, device=cpu, src=SimpleNamespace(classes=list("abcdefghij")))
    step = min(_fastnet_step_seconds(s, 1.0, resolve_precision("auto", cpu)) for _ in range(2))
    return min(8.0, max(1.0, step / REFERENCE_STEP_S))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, sample_dir) -> Path:
    """A fastnet run trained for 2 epochs on the packaged sample (shared by downstream tests)."""
    import imgclf

    os.environ.setdefault("IMGCLF_CACHE", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))
    project = tmp_path_factory.mktemp("runs")
    res = imgclf.train(data=str(sample_dir), epochs=2, project=str(project), name="tiny", progress=False,
                       tensorboard=False)
    return res.run_dir


def extract_shared(name: str, dest: Path) -> Path:
    """Extract ../shared/datasets/<name>.tar.gz into dest (skip the test if the file is absent)."""
    tar = SHARED / f"{name}.tar.gz"
    if not tar.exists():
        pytest.skip(f"{tar} not present (the shared data sets sit beside the repository)")
    with tarfile.open(tar) as t:
        t.extractall(dest, **SAFE_TAR)
    return dest


@pytest.fixture(scope="session")
def coco128(tmp_path_factory) -> Path:
    return extract_shared("coco128", tmp_path_factory.mktemp("coco")) / "coco128"


# -- a COCO-format data set built from real CIFAR-10 photos ----------------------------------

# coco128's facts that the multi-label tests check; the built set below records its own.
COCO128_FACTS = {
    "n_images": 128, "n_empty": 2, "n_categories": 80, "orphan_labels": ["000000000656", "000000000659"],
    "unlabelled": ["000000000250", "000000000508"], "subset": ["person", "dog", "cat"], "min_classes_with_positives": 11,
}


def make_coco_like(root: Path, sample_dir: Path, n_images: int = 60, seed: int = 0) -> dict:
    """A COCO-style detection set (images/, annotations/instances_train2017.json, YOLO labels/)
    whose objects are real CIFAR-10 photos pasted at random sizes onto noisy 96x80 canvases.

    It has what the multi-label tests rely on coco128 for, with the counts recorded, so they
    run without the shared tarball: category ids with gaps listed out of id order, two
    categories never used, images with 0-3 objects (two with none), crowd regions (one image
    whose crowd region is its largest object, one with only a crowd region), and a YOLO side
    with two label files whose images are missing and no label file for the empty images.
    """
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in (sample_dir / "train").iterdir()) + ["unicorn", "kraken"]  # last two: unused
    ids = [1, 2, 3, 5, 7, 8, 11, 13, 17, 18, 20, 23]
    cats = [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(ids, names)]
    photos = {n: sorted((sample_dir / "train" / n).glob("*.jpg")) for n in names[:10]}
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "annotations").mkdir()
    W, H = 96, 80
    images, anns, empty = [], [], []
    for k in range(n_images):
        img_id = 7 * k + 9
        stem = f"{img_id:012d}"
        canvas = rng.normal(120, 25, (H, W, 3)).clip(0, 255).astype(np.uint8)
        n_obj = 0 if k in (5, 17) else int(rng.integers(1, 4))
        objs = []
        for j in range(n_obj):
            c = int(rng.integers(0, 10))
            side = int(rng.integers(14, 48))
            x, y = int(rng.integers(0, W - side)), int(rng.integers(0, H - side))
            with Image.open(photos[names[c]][int(rng.integers(0, len(photos[names[c]])))]) as im:
                canvas[y:y + side, x:x + side] = np.asarray(im.convert("RGB").resize((side, side)))
            crowd = int((k == 11 and j == 0) or k == 23)
            if k == 11 and j == 0:  # a crowd region larger than any other object of its image
                x, y, side = min(x, W - 60), min(y, H - 60), 60
            objs.append((c, x, y, side, crowd))
        if not objs:
            empty.append(stem)
        Image.fromarray(canvas).save(root / "images" / f"{stem}.jpg", quality=92)
        images.append({"id": img_id, "file_name": f"{stem}.jpg", "width": W, "height": H})
        lines = []
        for c, x, y, side, crowd in objs:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": ids[c], "iscrowd": crowd,
                         "bbox": [x, y, side, side], "area": float(side * side) * 0.8 + len(anns) * 1e-3})
            lines.append(f"{c} {(x + side / 2) / W:.6f} {(y + side / 2) / H:.6f} {side / W:.6f} {side / H:.6f}")
        if lines:  # YOLO exports write no label file for an image without objects
            (root / "labels" / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    orphans = ["000000099990", "000000099991"]
    for s in orphans:
        (root / "labels" / f"{s}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    order = rng.permutation(len(cats))
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [cats[i] for i in order]}))
    return {"n_images": n_images, "n_empty": len(empty), "n_categories": len(cats), "orphan_labels": orphans,
            "unlabelled": empty, "subset": ["airplane", "dog", "cat"], "min_classes_with_positives": 4}


@pytest.fixture(scope="session", params=["built", "coco128"])
def coco(request, tmp_path_factory, sample_dir) -> tuple[Path, dict]:
    """(root, facts) of a COCO-format set: one built from CIFAR-10 photos (always there) and the
    real coco128 (when the shared tarball is beside the repository)."""
    if request.param == "coco128":
        return request.getfixturevalue("coco128"), COCO128_FACTS
    root = tmp_path_factory.mktemp("coco-like") / "coco-like"
    return root, make_coco_like(root, sample_dir)


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A test that leaves torch's thread count changed fails: once a failed in-process 'serve'
    left it at 1, and the 450 tests after it ran on one core, twice as slow."""
    import torch

    get, put = torch.get_num_threads, torch.set_num_threads  # the real ones: a test may patch them
    before = get()
    yield
    after = get()
    if after != before:
        put(before)
        pytest.fail(f"the test left torch at {after} thread(s), not {before}")
