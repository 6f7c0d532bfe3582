"""Run-folder fixes: a default-named run killed before its first checkpoint, and the like."""

from __future__ import annotations

import subprocess
import sys

import imgclf

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def _orphan(project, name: str):
    """What kill -9 during the decode or the first epoch leaves: a config.yaml and no checkpoint
    (test_core's kill test makes one for real)."""
    folder = project / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("data: photos\n")
    return folder


def test_default_named_run_killed_before_its_first_checkpoint_is_started_over(small_sample, tmp_path, capfd):
    # kill -9 during the decode or the first epoch of 'imgclf train --data photos/' left
    # photos-fastnet-1 with a config and nothing else; the same command made photos-fastnet-2 and
    # the empty -1 stayed in every runs/ listing and compare
    from imgclf.api import _default_name

    opts = dict(data=str(small_sample), project=str(tmp_path), **FAST)
    base = f"{small_sample.name}-fastnet-"
    orphan = _orphan(tmp_path, base + "1")
    res = imgclf.train(**opts)
    assert res.run_dir == orphan and (orphan / "model.json").is_file()
    assert "stopped before its first checkpoint: starting over in it" in capfd.readouterr().err
    # a finished run is never taken, nor an orphan another process trains in (not saved yet)
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"
    held = _orphan(tmp_path, base + "2")
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from imgclf.runs import hold_run; "
                               f"hold_run({str(held)!r}); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "3"
    finally:
        holder.kill()
        holder.wait()
    assert _default_name(tmp_path, small_sample.name, "fastnet") == base + "2"  # its lock went with it
