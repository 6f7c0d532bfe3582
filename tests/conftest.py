"""Shared fixtures: real data only (the packaged CIFAR-10 sample and the shared data sets)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGCLF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
_EXTRACTED: list[str] = []


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
            with tarfile.open(tar) as t:
                t.extractall(dest, filter="data")
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
        t.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def coco128(tmp_path_factory) -> Path:
    return extract_shared("coco128", tmp_path_factory.mktemp("coco")) / "coco128"
