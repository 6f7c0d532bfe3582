"""Review findings on the pixel-CSV header of column numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_a_test_csv_headed_by_column_numbers_keeps_its_first_pixel(tmp_path):
    # trained on pandas' DataFrame(np.column_stack([y, X])).to_csv(index=False) with --label-column 0
    # (header 0..784), then predict on DataFrame(X_test).to_csv(index=False) (header 0..783, no
    # label): the pixel column headed '0' was taken for the label by its name and the file refused
    # as '783 pixel columns, not HxW'
    from imgclf.data.arrays import read_pixel_images

    x = np.random.default_rng(0).integers(0, 256, (4, 784))
    (tmp_path / "test.csv").write_text("\n".join([",".join(str(i) for i in range(784)),
                                                  *(",".join(map(str, r)) for r in x)]) + "\n")
    for column in (0, "0"):
        images = read_pixel_images(tmp_path / "test.csv", label_column=column)
        assert images.shape == (4, 28, 28, 3) and np.array_equal(images[..., 0].reshape(4, -1), x), column
    # the labelled file of the same kind still loses its label column
    (tmp_path / "train.csv").write_text("\n".join([",".join(str(i) for i in range(785)),
                                                   *(f"{i % 3}," + ",".join(map(str, r)) for i, r in enumerate(x))]))
    images = read_pixel_images(tmp_path / "train.csv", label_column=0)
    assert np.array_equal(images[..., 0].reshape(4, -1), x)


def test_sweep_data_arrays_are_saved_as_the_base_saves_them(tmp_path, monkeypatch):
    # imgclf.sweep(study, data=(x, y)) with base: {classes: [...], cache_dir: ...} saved the arrays
    # into the default cache with labels 0, 1, 2, and every trial then failed on '--classes: airplane,
    # automobile, bird not in .../arrays-<hash>.npz (its classes: 0, 1, 2)'
    import imgclf
    from imgclf.data.npz import read_npz
    from imgclf.tune import sweep as sw

    seen = {}

    class Stop(Exception):
        pass

    def load_spec(study, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(sw, "load_spec", load_spec)
    monkeypatch.setenv("IMGCLF_CACHE", str(tmp_path / "default"))
    x, y = np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1, 2, 0, 1, 2])
    names = ["airplane", "automobile", "bird"]
    study = {"name": "s", "base": {"model": "plaincnn", "classes": names, "cache_dir": str(tmp_path / "mine")},
             "space": {"lr": {"low": 1e-4, "high": 1e-2}}}
    try:
        imgclf.sweep(study, data=(x, y))
    except Stop:
        pass
    saved = Path(seen["data"])
    assert saved.is_relative_to(tmp_path / "mine") and not (tmp_path / "default").exists()
    assert read_npz(saved).classes == names


def test_small_review_points_of_the_size_parser_and_the_disk_check():
    # '5.' was refused by the size parser (float() took it); an error raised 'from None' while
    # handling a full disk is not a full disk
    import errno

    from imgclf.config import parse_gib
    from imgclf.engine.trainer import _disk_full

    assert parse_gib("5.") == 5.0 and parse_gib(".5G") == 0.5
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise ValueError("something else") from None
    except ValueError as e:
        assert not _disk_full(e)
