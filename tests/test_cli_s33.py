"""A new user's findings: a last.pt cut short, run folders that cannot be written (calibrate,
--resume), and --model-args over a --config file's model arguments."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
from pathlib import Path

import pytest
import torch

from imgclf.errors import UserError


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_sample) -> Path:
    """A 1-epoch fastnet run on 400 images: a model.json, weights and a last.pt to work on."""
    import imgclf

    os.environ.setdefault("IMGCLF_CACHE", str(tmp_path_factory.getbasetemp() / "imgclf-cache"))
    res = imgclf.train(data=str(small_sample), epochs=1, project=str(tmp_path_factory.mktemp("runs")), name="r",
                       progress=False, tensorboard=False, tta=False)
    return res.run_dir


@contextlib.contextmanager
def read_only(folder: Path, monkeypatch):
    """``folder`` refuses new files as a read-only mount does. chmod does it for a user; root
    writes through permission bits, so there opening a file in it for writing is refused too."""
    folder.chmod(0o555)
    where = os.path.realpath(folder)

    def inside(path) -> bool:
        return isinstance(path, str | os.PathLike) and os.path.dirname(os.path.realpath(path)) == where

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_os_open, real_io_open = os.open, io.open

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def io_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_io_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr(builtins, "open", io_open)
    try:
        yield
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)


# 1. a last.pt cut short within its first 64 KiB: torch raises OSError(EINVAL) for it, which was
#    taken for an unreadable file ('cannot read the checkpoint (Invalid argument)')

def test_a_checkpoint_cut_short_is_said_to_be_damaged(tmp_path):
    from imgclf.engine.trainer import read_checkpoint

    full = tmp_path / "full.pt"
    torch.save({"model": {"w": torch.zeros(100_000)}, "optimizer": {}, "step": 1, "epoch": 1}, full)
    last = tmp_path / "last.pt"
    last.write_bytes(full.read_bytes()[:5000])  # a copy cut short
    (tmp_path / "best.safetensors").write_bytes(b"")
    for mmap in (True, False):  # --resume's first look reads it with mmap, the trainer without
        with pytest.raises(UserError) as e:
            read_checkpoint(last, mmap=mmap)
        msg = str(e.value)
        assert "is damaged" in msg and "Invalid argument" not in msg, msg
        assert "best.safetensors" in msg and "trains the run again from its beginning" in msg


# 2. calibrate on a run folder that cannot be written: a traceback after decoding and scoring

def test_calibrate_on_a_read_only_run_is_one_line_before_any_work(small_run, small_sample, tmp_path, monkeypatch):
    from imgclf.evaluate.calibrate import calibrate_run

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    before = (run / "model.json").read_text()
    with read_only(run, monkeypatch), pytest.raises(UserError, match="cannot store a new temperature"):
        calibrate_run(run, str(small_sample / "test"), progress=False)
    assert (run / "model.json").read_text() == before


# 3. --resume of a run whose folder cannot be written: a traceback once the data were decoded

def test_resume_of_a_read_only_run_is_one_line(small_run, tmp_path, monkeypatch):
    import imgclf

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "summary.json").unlink()  # as a run stopped before it finished has none
    with read_only(run, monkeypatch), pytest.raises(UserError, match="cannot write in the run folder"):
        imgclf.train(resume=str(run), progress=False)
    # a finished run is still only reported: --resume writes nothing there
    finished = tmp_path / "finished"
    shutil.copytree(small_run, finished)
    with read_only(finished, monkeypatch):
        assert imgclf.train(resume=str(finished)).extras.get("finished_already")


# 4. --model-args with a --config file that sets model_args: the file's other arguments stay

def test_model_args_on_the_command_line_update_the_files(tmp_path):
    from imgclf.cli import build_parser
    from imgclf.config import make_config

    f = tmp_path / "run.yaml"
    f.write_text("data: cifar10\nmodel: plaincnn\nmodel_args: {channels: [32, 64], dense: [512], batchnorm: false}\n")

    def config(*argv):
        args = build_parser().parse_args(["train", "--config", str(f), *argv])
        return make_config(args.config, **{k: v for k, v in vars(args).items() if k == "model_args"})

    assert config("--model-args", "dropout=0.3,dense=[256]").model_args == {
        "channels": [32, 64], "dense": [256], "batchnorm": False, "dropout": 0.3}
    assert config().model_args == {"channels": [32, 64], "dense": [512], "batchnorm": False}
    assert config("--model-args", "none").model_args == {}  # 'none' takes back what the file set
    # the file's own form, key=value text, too
    f.write_text("data: cifar10\nmodel: plaincnn\nmodel_args: channels=[32,64],dense=[512]\n")
    assert config("--model-args", "dropout=0.3").model_args == {"channels": [32, 64], "dense": [512], "dropout": 0.3}


def test_model_args_given_twice_add_up(tmp_path):
    # argparse's store let the second --model-args replace the first: the Keras CNN's channels
    # were dropped for '--model-args dropout=0.3' typed after them
    from imgclf.cli import build_parser

    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--model-args", "channels=[16,32],dropout=0.1",
                                      "--model-args", "dropout=0.3"])
    assert args.model_args == {"channels": [16, 32], "dropout": 0.3}


def test_config_file_slips_are_named_for_what_they_are(tmp_path):
    # 'resume: true' was told "did you mean 'resize'?", and 'data:' left empty "Input should be a
    # valid string (got None)"
    from imgclf.config import make_config

    (tmp_path / "r.yaml").write_text(f"data: {tmp_path}\nresume: true\n")
    with pytest.raises(UserError, match=r"unknown option 'resume'; a run is continued with 'imgclf train --resume RUN'"):
        make_config(tmp_path / "r.yaml")
    (tmp_path / "e.yaml").write_text("data:\nepochs: 2\n")
    with pytest.raises(UserError, match=r"option 'data' is empty: give it a value$"):
        make_config(tmp_path / "e.yaml")


def test_resume_takes_a_file_of_the_run_for_the_run(small_run):
    # '--resume runs/x/config.yaml' said 'not a run folder (no config.yaml)'
    import imgclf

    res = imgclf.train(resume=str(small_run / "config.yaml"), progress=False)
    assert res.run_dir.resolve() == small_run.resolve() and res.test is not None


def test_ram_budget_takes_a_size_with_its_unit(tmp_path):
    # '--ram-budget 200MB' was argparse's 'invalid float value'; a plain number is still GiB
    from imgclf.cli import build_parser
    from imgclf.config import make_config

    args = build_parser().parse_args(["train", "--data", str(tmp_path), "--ram-budget", "200MB"])
    assert make_config(data=str(tmp_path), ram_budget=args.ram_budget).ram_budget == pytest.approx(200e6 / 2**30)
    for given, gib in (("512MiB", 0.5), ("4G", 4.0), (1.5, 1.5), ("0", 0.0)):
        assert make_config(data=str(tmp_path), ram_budget=given).ram_budget == gib
    with pytest.raises(UserError, match="'lots' is not a size"):
        make_config(data=str(tmp_path), ram_budget="lots")


def test_model_args_over_a_file_of_another_model_or_after_none_are_taken_alone(tmp_path):
    # '--config run.yaml --model fastnet --model-args width=0.5' merged the file's plaincnn channels
    # into fastnet's arguments ('not known to FastNet'), and 'none' then 'dropout=0.2' merged them back
    from imgclf.cli import build_parser
    from imgclf.config import make_config

    (tmp_path / "run.yaml").write_text(f"data: {tmp_path}\nmodel: plaincnn\nmodel_args: {{channels: [16, 32], dense: [64]}}\n")

    def resolved(*argv):
        args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), *argv])
        return make_config(args.config, **{k: getattr(args, k) for k in ("model", "model_args") if hasattr(args, k)})

    assert resolved("--model", "fastnet", "--model-args", "width=0.5").model_args == {"width": 0.5}
    assert resolved("--model-args", "none", "--model-args", "dropout=0.2").model_args == {"dropout": 0.2}
    assert resolved("--model-args", "dropout=0.2").model_args == {"channels": [16, 32], "dense": [64], "dropout": 0.2}
    assert resolved("--model", "plaincnn", "--model-args", "dropout=0.2").model_args["channels"] == [16, 32]
