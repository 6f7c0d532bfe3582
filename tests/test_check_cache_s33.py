"""``imgclf cache --clear`` while a run has an entry open: the entry is kept, and the message says so."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.cli import main


def _photos(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from imgclf.data.cache import build_cache
    from imgclf.data.sources import load_source
    data, root = sys.argv[1], Path(sys.argv[2])
    src = load_source(data, val_split=0.0, cache_dir=root)
    cs = build_cache(src.train, 16, "stretch", root / "images", workers=1, progress=False)
    print("ready", flush=True)
    sys.stdin.readline()  # a training run still reading cs.images
    print(int(cs.images[cs.rows].sum()) > 0, flush=True)
""")


def test_clear_keeps_an_entry_a_running_process_has_open_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    data, root = _photos(tmp_path / "photos"), tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-c", _RUN, str(data), str(root)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "ready"
        npy = next((root / "images").glob("*.npy"))
        assert main(["cache", "--cache-dir", str(root), "--clear"]) == 0
        out = capsys.readouterr().out
        assert npy.exists() and npy.with_suffix(".json").exists()  # nothing in use is deleted
        assert "removed 0 entries" in out and "kept 1 in use by a running process" in out, out
        assert str(npy) in out
        run.stdin.write("\n")
        run.stdin.flush()
        assert run.stdout.readline().strip() == "True"
    finally:
        run.stdin.close()
        run.wait(timeout=30)
    # the run has ended: its entry is freed like any other
    assert main(["cache", "--cache-dir", str(root), "--clear"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 entries" in out and "in use" not in out, out
    assert not npy.exists()


def test_check_refuses_its_own_bad_options_before_decoding_any_image(tmp_path, capsys, monkeypatch):
    import imgclf.data.cache as cache

    data, root = _photos(tmp_path / "photos"), tmp_path / "cache"

    def no_decoding(*a, **k):
        raise AssertionError("decoded before the options were checked")

    monkeypatch.setattr(cache, "build_cache", no_decoding)
    for opt, value in (("--near-threshold", "17"), ("--near-threshold", "-1"), ("--max-images", "0"),
                       ("--max-images", "-5")):
        code = main(["check", str(data), "--cache-dir", str(root), "--out", str(tmp_path / "out"), opt, value,
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, (opt, value, err)
        assert f"{opt} {value}: expected" in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "images").exists()  # nothing decoded, nothing cached


def test_demo_refuses_a_bad_epochs_in_the_train_command_s_words(capsys):
    # 'config: option 'epochs': Input should be greater than 0 (got 0.0)' named no flag
    from imgclf.cli import main

    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs 0: must be greater than 0" in capsys.readouterr().err
