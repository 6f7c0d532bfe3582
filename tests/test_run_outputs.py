"""What a run leaves and shows: fresh folders, readable figures, numbers as configured, bounded checks."""

from __future__ import annotations

import os
import time

import matplotlib.figure
import numpy as np
import pytest

from imgclf.config import TrainConfig
from imgclf.errors import UserError


def test_thousands_of_copies_of_one_picture_make_a_star_not_millions_of_pairs():
    from imgclf.data.phash import near_pairs

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=6000, dtype=np.int64).astype(np.uint64)
    copies = rng.choice(np.arange(100, 6000), size=4000, replace=False)
    h[copies] = h[copies[0]]  # a "photo unavailable" placeholder, 4000 times: 8M pairs per band before
    h[5] = h[6] ^ np.uint64(0b111)  # and one ordinary near pair (3 bits apart)
    t0 = time.perf_counter()
    pairs = near_pairs(h, 4)
    assert time.perf_counter() - t0 < 5
    star = pairs[pairs[:, 2] == 0]
    first = np.sort(copies)[0]
    assert len(star) == 3999 and set(star[:, 0]) | set(star[:, 1]) == set(copies.tolist())
    assert (5, 6, 3) in {tuple(r) for r in pairs.tolist()}
    assert first in star[:, :2]


def test_small_values_keep_their_digits_in_compare_and_the_report(tmp_path):
    from imgclf.evaluate.compare import _fmt
    from imgclf.evaluate.report import section_config

    assert (_fmt(1e-5), _fmt(3e-5), _fmt(0.91234)) == ("1e-05", "3e-05", "0.9123")
    # config values as written, seconds to a tenth: were 0.0469, 10.3500, 0.0000 and 47.8000
    assert [_fmt(v, "x", config=True) for v in (0.046875, 10.35, 0.0)] == ["0.046875", "10.35", "0"]
    assert _fmt(47.8, "train_seconds") == "47.8"
    (tmp_path / "config.yaml").write_text("lr: 3.0e-05\nema: 0.99995\neps: 1.0e-08\n")
    html = section_config(tmp_path, {"architecture": "fastnet"})
    assert "3e-05" in html and "0.99995" in html and "1e-08" in html


def _saved_figures(monkeypatch) -> list:
    figs = []
    real = matplotlib.figure.Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_one_epoch_curves_are_drawn_and_multilabel_shows_map(tmp_path, monkeypatch):
    from imgclf.evaluate.plots import plot_curves

    figs = _saved_figures(monkeypatch)
    plot_curves([{"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "lr": 0.1}], tmp_path / "c.png")
    loss_ax, _, lr_ax = figs[-1].axes
    assert loss_ax.lines[0].get_marker() == "o" and lr_ax.lines[0].get_marker() == "o"  # a point, not nothing
    plot_curves([{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.9, "val_acc": 0.99, "val_map": 0.4,
                  "lr": 0.1} for e in (1, 2)], tmp_path / "m.png")
    assert figs[-1].axes[1].get_ylabel() == "mAP"


def test_confusion_matrix_of_many_classes_drops_the_unreadable_names(tmp_path, monkeypatch):
    from imgclf.evaluate.plots import plot_confusion

    figs = _saved_figures(monkeypatch)
    n = 300
    t0 = time.perf_counter()
    plot_confusion(np.eye(n, dtype=int) * 5, [f"class_{i}" for i in range(n)], tmp_path / "cm.png")
    assert time.perf_counter() - t0 < 20
    assert len(figs[-1].axes[0].get_xticklabels()) == 0 and (tmp_path / "cm.png").stat().st_size > 0


def test_exist_ok_starts_the_reused_folder_without_the_old_runs_results(tmp_path):
    from imgclf.api import _make_run_dir

    run = tmp_path / "runs" / "r"
    (run / "tensorboard").mkdir(parents=True)
    (run / "eval-test").mkdir()
    for f in ("model.json", "model.safetensors", "metrics.json", "confusion.png", "report.html", "notes.txt",
              "model.onnx", "model.onnx.json", "model.onnx.parity.json", "model.torchscript.pt"):
        (run / f).write_text("old")
    cfg = TrainConfig(data="x", project=str(tmp_path / "runs"), name="r", exist_ok=True)
    assert _make_run_dir(cfg, "x", "fastnet") == run
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the user's own file stays


def test_devices_that_do_not_exist_are_one_line():
    import torch

    from imgclf.runs import resolve_device

    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(UserError, match="MPS is not available"):
            resolve_device("mps")
    if torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda:1")


def test_log_lines_go_above_a_live_progress_bar(capsys):
    import sys

    from tqdm import tqdm

    from imgclf import log

    with tqdm(total=3, file=sys.stderr, disable=False) as bar:
        bar.update(1)
        log.info("unfreezing the backbone")
    err = capsys.readouterr().err
    assert "imgclf: unfreezing the backbone\n" in err
    # tqdm.write clears the bar's line first, so the message starts its own line
    assert "\rimgclf: unfreezing" in err or "\nimgclf: unfreezing" in err


def test_near_threshold_out_of_range_is_one_line(small_sample, tmp_path, capsys):
    from imgclf.cli import main

    assert main(["check", "--data", str(small_sample), "--near-threshold", "64", "--out", str(tmp_path / "c")]) == 2
    assert "--near-threshold 64: expected 0..16" in capsys.readouterr().err


def test_distributed_validation_shards_cover_every_image_once():
    import torch

    from imgclf.data.cache import CachedSplit
    from imgclf.data.loader import BatchLoader

    n = 41  # not a multiple of the 2 ranks: the old shards left image 40 out
    data = CachedSplit(np.zeros((n, 4, 4, 3), np.uint8), np.arange(n), np.arange(n) % 3, [])
    seen = []
    for rank in (0, 1):
        val = BatchLoader(data, 8, torch.device("cpu"), shuffle=False, rank=rank, world=2)
        idx = val.order(0).tolist()
        assert len(idx) == val.num_samples
        seen += idx
    assert sorted(seen) == list(range(n))
    train = [BatchLoader(data, 8, torch.device("cpu"), shuffle=True, rank=r, world=2) for r in (0, 1)]
    assert len(train[0].order(0)) == len(train[1].order(0)) == 20  # training shards stay equal


def test_weights_are_readable_as_the_umask_allows_like_the_runs_other_files(tiny_run):
    # safetensors writes 0600: a run shared with a team, or served by another account, failed to load
    import stat

    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for name in ("model.safetensors", "best.safetensors", "model.json", "metrics.csv"):
        assert stat.S_IMODE((tiny_run / name).stat().st_mode) == expected, name


def test_class_names_no_font_can_draw_are_one_line_not_a_warning_per_glyph(tmp_path):
    """日本 with only DejaVu Sans installed: matplotlib warned per glyph and figure, two lines
    each with its source path. One line now, once per process, naming the classes."""
    import subprocess
    import sys

    code = ("import numpy as np; from imgclf.evaluate import plots\n"
            "for f in ('a.png', 'b.png'):\n"
            "    plots.plot_confusion(np.eye(3) * 5, ['日本', 'Hund ü', 'cat'], f)\n"
            "print(all(any(ord(c) in m for m in plots._charmaps()) for c in '日本'))")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Glyph" not in r.stderr and "Warning" not in r.stderr
    if r.stdout.strip() == "False":  # machines with a CJK font draw them and have nothing to say
        assert r.stderr.count("have characters no installed font has") == 1 and "'日本'" in r.stderr
        assert "Hund ü" not in r.stderr
    assert (tmp_path / "b.png").stat().st_size > 0
