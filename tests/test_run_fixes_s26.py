"""Run-folder fixes: a damaged or finished run given to --resume, closed pipes, evaluation arrays
and folders, a run whose data moved, SIGTERM before the first checkpoint."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import imgclf
from imgclf.cli import main
from imgclf.errors import UserError

FAST = dict(epochs=1, progress=False, tensorboard=False, batch_size=64)


def _copy(run: Path, dest: Path, *, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run, dest)
    for name in drop:
        (dest / name).unlink()
    return dest


def _set_config(run: Path, **values) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


# -- 1. a damaged last.pt ----------------------------------------------------------------------

def test_a_damaged_checkpoint_is_one_line_that_says_what_is_left(tiny_run, tmp_path, capsys):
    last = (tiny_run / "last.pt").read_bytes()
    # stopped while finishing (no summary.json): its model is there
    with_model = _copy(tiny_run, tmp_path / "with-model", drop=("summary.json",))
    (with_model / "last.pt").write_bytes(last[:1_000_000])
    assert main(["train", "--resume", str(with_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{with_model / 'last.pt'} is damaged (truncated or not a checkpoint): PytorchStreamReader" in err
    assert "model (model.safetensors) is not affected" in err
    # stopped within training: its best epoch's weights, or a start from the beginning
    bare = _copy(tiny_run, tmp_path / "bare", drop=("summary.json", "model.json", "model.safetensors"))
    (bare / "last.pt").write_bytes(b"")
    assert main(["train", "--resume", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "is damaged (truncated or not a checkpoint): an empty file" in err and err.count("\n") == 1
    assert f"--weights {bare / 'best.safetensors'}" in err and f"'imgclf train --resume {bare}'" in err
    (bare / "best.safetensors").unlink()
    torch.save({"weights": torch.zeros(2)}, bare / "last.pt")  # a torch file, not a checkpoint
    with pytest.raises(UserError, match=r"is damaged .*: it holds no training state; delete .*last.pt, and "
                                        r"imgclf.train\(resume="):
        imgclf.train(resume=bare)


# -- 2. a finished run given to --resume -------------------------------------------------------

def test_resume_of_a_finished_run_leaves_it_as_it_is(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path / "done")
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    assert main(["train", "--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    top1 = json.loads((run / "summary.json").read_text())["top1"]
    assert err == (f"imgclf: {run} finished already (epoch 2 of 2; test top-1 {top1:.4f}): nothing to resume; to "
                   f"train it further, start a run from its weights: imgclf train --config {run / 'config.yaml'} "
                   f"--weights {run} --epochs N --name NEW\n")
    assert out == ""
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before  # nothing redone
    res = imgclf.train(resume=run)  # the Python API: the run's result as it is
    assert res.test["top1"] == top1 and len(res.history) == 2 and res.extras["finished_already"]


# -- 3. a reader that goes away ----------------------------------------------------------------

class _ClosesAfter(io.StringIO):
    """A pipe whose reader leaves after ``n`` writes (``| head``)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def write(self, s):
        self.n -= 1
        if self.n < 0:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(s)


def test_predict_into_a_closed_pipe_ends_quietly(tiny_run, sample_dir):
    # a real pipe: 1000 lines are more than its buffer holds, so the writes meet the closed end
    p = subprocess.Popen([sys.executable, "-m", "imgclf", "predict", str(tiny_run), str(sample_dir / "test"),
                          "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert first.startswith(str(sample_dir / "test").encode())
    assert "Traceback" not in err and "Broken" not in err


def test_evaluate_and_train_go_on_when_their_reader_leaves(tiny_run, small_sample, tmp_path, monkeypatch):
    run = _copy(tiny_run, tmp_path / "ev")
    monkeypatch.setattr(sys, "stdout", _ClosesAfter(2))
    assert main(["evaluate", str(run), "--data", str(small_sample / "test"), "--no-progress"]) == 0
    # 'imgclf train ... 2>&1 | head -3': the run goes on and is written whole, its checkpoint too
    monkeypatch.setattr(sys, "stderr", _ClosesAfter(3))
    assert main(["train", "--data", str(small_sample), "--project", str(tmp_path), "--name", "piped",
                 "--epochs", "1", "--batch-size", "64", "--no-progress", "--no-tensorboard"]) == 0
    assert (tmp_path / "piped" / "model.json").is_file() and (tmp_path / "piped" / "last.pt").is_file()


# -- 4. evaluation arrays ----------------------------------------------------------------------

def test_evaluation_arrays_go_to_the_runs_cache_and_refused_ones_leave_nothing(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "arr")
    _set_config(run, cache_dir=str(tmp_path / "run-cache"))
    default = Path(os.environ["IMGCLF_CACHE"]) / "arrays"
    was = sorted(default.glob("*")) if default.is_dir() else []
    x = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    for y, msg in ((np.full(20, 12), "evaluation arrays: label 12 but 10 classes"),
                   (np.zeros(19, int), "evaluation arrays: 19 labels (shape (19,)) for 20 images")):
        with pytest.raises(UserError) as e:
            imgclf.evaluate(run, data=(x, y), progress=False)
        assert str(e.value).startswith(msg), str(e.value)
        assert "train labels" not in str(e.value) and ".npz" not in str(e.value)
    assert not (tmp_path / "run-cache" / "arrays").exists()  # nothing left behind
    m = imgclf.evaluate(run, data=(x, np.arange(20) % 10), progress=False)
    assert m["n"] == 20 and len(list((tmp_path / "run-cache" / "arrays").glob("arrays-*.npz"))) == 1
    assert (sorted(default.glob("*")) if default.is_dir() else []) == was  # not the default cache


# -- 5. a run whose data moved -----------------------------------------------------------------

def test_a_run_whose_data_moved_says_so_not_no_such_data(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path / "moved")
    gone = tmp_path / "gone"
    _set_config(run, data=str(gone))
    for command in ("evaluate", "calibrate"):
        assert main([command, str(run)]) == 2
        assert capsys.readouterr().err == (f"imgclf: error: the data this run was trained on (config.yaml data: "
                                           f"{gone}) is not there any more: pass --data FOLDER\n")
    from imgclf.evaluate.report import write_report

    assert f"config.yaml data: {gone}) is not there any more" in write_report(run, device="cpu").read_text()
    (run / "summary.json").unlink()  # not finished: --resume would read the data
    with pytest.raises(UserError) as e:
        imgclf.train(resume=run)
    assert str(e.value) == (f"--resume {run}: the data this run was trained on (config.yaml data: {gone}) is "
                            f"not there any more: put it back, or set data: in {run / 'config.yaml'} to "
                            "where it is now")


# -- 6. evaluation folders of data that share a name -------------------------------------------

def test_two_data_folders_of_one_name_get_their_own_evaluation_folders(tiny_run, sample_dir, tmp_path,
                                                                         capsys):
    run = _copy(tiny_run, tmp_path / "run")
    for side, pick in (("a", slice(0, 3)), ("b", slice(3, 6))):
        for c in sorted((sample_dir / "test").iterdir()):
            (tmp_path / side / "other" / c.name).mkdir(parents=True)
            for f in sorted(c.glob("*.jpg"))[pick]:
                shutil.copy(f, tmp_path / side / "other" / c.name / f.name)
    a, b = tmp_path / "a" / "other", tmp_path / "b" / "other"
    assert imgclf.evaluate(run, a, progress=False)["out_dir"] == str(run / "eval-other")
    assert imgclf.evaluate(run, b, progress=False)["out_dir"] == str(run / "eval-other-2")
    err = capsys.readouterr().err
    assert "eval-other holds the evaluation of other data: this one goes to eval-other-2" in err
    # the same data again: its own folder, overwritten
    assert main(["evaluate", str(run), "--data", str(a), "--no-progress"]) == 0
    assert f"figures: {run / 'eval-other'}\n" in capsys.readouterr().out
    assert sorted(p.name for p in run.glob("eval-other*")) == ["eval-other", "eval-other-2"]
    assert json.loads((run / "eval-other" / "metrics.json").read_text())["data"] == str(a)
    assert json.loads((run / "eval-other-2" / "metrics.json").read_text())["data"] == str(b)


# -- 7. SIGTERM before the first checkpoint ----------------------------------------------------

_SIGTERM_AT = """
import os, signal, sys
import imgclf.api
from imgclf.cli import main
from imgclf.engine.callbacks import Callback

class Term(Callback):
    def on_train_start(self, t):
        if {step} == 0:
            os.kill(os.getpid(), signal.SIGTERM)
    def on_step_end(self, t):
        if t.step == {step}:
            os.kill(os.getpid(), signal.SIGTERM)

train = imgclf.api.train
imgclf.api.train = lambda *a, **k: train(*a, callbacks=[Term()], **k)
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("step", [0, 2])
def test_sigterm_stops_a_run_as_ctrl_c_does(small_sample, tmp_path, step):
    """SIGTERM before any step: the new run's folder goes (nothing to resume), so the same
    command, or a default-named run, starts again where it was; within an epoch: the step in
    progress is saved and the run resumes from it."""
    argv = ["train", "--data", str(small_sample), "--project", str(tmp_path), "--name", "t", "--epochs", "2",
            "--batch-size", "64", "--checkpoint-minutes", "0", "--no-progress", "--no-tensorboard"]
    r = subprocess.run([sys.executable, "-c", _SIGTERM_AT.format(step=step, argv=argv)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert "imgclf: terminated" in r.stderr and "Traceback" not in r.stderr
    if step == 0:
        assert "stopped before the first checkpoint" in r.stderr and not (tmp_path / "t").exists()
    else:
        state = torch.load(tmp_path / "t" / "last.pt", weights_only=True)
        assert state["step"] == 2 and state["in_epoch"]["batch"] == 2
        assert f"stopped: continue with 'imgclf train --resume {tmp_path / 't'}'" in r.stderr


def test_a_stop_during_the_data_check_removes_the_new_run_folder(small_sample, tmp_path, monkeypatch):
    import imgclf.data.checks

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(imgclf.data.checks, "check_for_training", stop)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(data=str(small_sample), project=str(tmp_path), **FAST)
    assert list(tmp_path.iterdir()) == []  # a default-named run made again is NAME-1, not NAME-2


def test_resume_on_another_machine_may_name_its_cache_and_decoding_processes(tiny_run, tmp_path):
    """--cache-dir, --workers and --ram-budget change where and how images are decoded, not the
    result: --resume takes them (it refused them with 'drop: --cache-dir') and records them."""
    run = _copy(tiny_run, tmp_path / "run", drop=("summary.json",))  # not finished: the ending is left
    res = imgclf.train(resume=run, cache_dir=str(tmp_path / "here"), workers=1, progress=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["cache_dir"] == str(tmp_path / "here") and saved["workers"] == 1
    assert (tmp_path / "here").is_dir() and res.test["n"] > 0
    with pytest.raises(UserError, match="drop: --epochs|drop: epochs"):
        imgclf.train(resume=run, epochs=9)
