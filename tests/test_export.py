"""Export parity: ONNX and TorchScript of the default FastNet and of a timm model agree with PyTorch."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx  # the test install, .[dev], always has the [deploy] extra
import onnxruntime as ort
import pytest
import torch

from imgclf.deploy.export import (  # noqa: E402
    LOGIT_TOLERANCE,
    check_parity,
    export,
    parity_images_for,
    read_onnx_metadata,
)


def _check_report(report: dict, n: int = 64) -> None:
    assert report["passed"], report
    assert report["n"] == n and report["top1_agree"] == n
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert report["tolerance"] == pytest.approx(LOGIT_TOLERANCE * max(1.0, report["max_abs_logit"]))


def test_fastnet_onnx_parity_metadata_and_dynamic_batch(tiny_run, tmp_path, capsys):
    out = tmp_path / "fast.onnx"
    report = export(tiny_run, "onnx", out)
    _check_report(report)
    assert "test split" in report["images_from"]  # the run's own test data, not a fallback
    printed = capsys.readouterr().out
    assert "parity PASSED on 64 images" in printed and "tolerance" in printed
    saved = json.loads((tmp_path / "fast.onnx.parity.json").read_text())
    assert saved["top1_agree"] == 64 and saved["passed"]

    run_meta = json.loads((tiny_run / "model.json").read_text())
    meta = read_onnx_metadata(out)
    assert meta == json.loads((tmp_path / "fast.onnx.json").read_text())
    for key in ("classes", "image_size", "resize", "mean", "std", "temperature", "thresholds", "task"):
        assert meta[key] == run_meta[key], key
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == run_meta["classes"] and json.loads(props["resize"]) == run_meta["resize"]
    assert "softmax" in meta["outputs"]["probs"]
    # enough to reproduce the resize without imgclf, from images.py's own constants
    from imgclf.data.images import LETTERBOX_FILL, SIXTEEN_BIT_RULE

    details = meta["resize_details"]
    assert details["policy"] == run_meta["resize"] and details["interpolation"] == "bicubic"
    assert details["letterbox_fill"] == [LETTERBOX_FILL] * 3 and details["alpha_background"] == [255, 255, 255]
    assert "centred" in details["letterbox_position"] and "centre" in details["crop"]
    assert details["exif_orientation"].startswith("applied") and details["sixteen_bit"] == SIXTEEN_BIT_RULE
    assert json.loads(props["resize_details"]) == details
    assert set(report["batch_sizes"]) == {"64", "1", "3"} and all(b["passed"] for b in report["batch_sizes"].values())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    images, _ = parity_images_for(tiny_run, run_meta, 7)
    for n in (1, 7):  # dynamic batch
        logits, probs = sess.run(["logits", "probs"], {"images": images[:n]})
        assert logits.shape == (n, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_fastnet_torchscript_parity(tiny_run, tmp_path):
    out = tmp_path / "fast.torchscript.pt"
    _check_report(export(tiny_run, "torchscript", out, verbose=False))
    extra = {"imgclf.json": ""}
    mod = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["imgclf.json"])["classes"][0] == "airplane"
    logits, probs = mod(torch.zeros(3, 32, 32, 3, dtype=torch.uint8))
    assert logits.shape == (3, 10)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, sample_dir):
    """timm:resnet18 built by the registry and saved as a run (BN statistics set on real images, so
    the logits are a realistic spread rather than an untrained model's near-ties)."""
    from imgclf.data.augment import Normalize
    from imgclf.data.images import load_resized
    from imgclf.models.registry import IMAGENET_MEAN, IMAGENET_STD, arch_args_for_record, build_model
    from imgclf.runs import write_model

    torch.manual_seed(0)
    classes = sorted(p.name for p in (sample_dir / "train").iterdir())
    args = arch_args_for_record("timm:resnet18", 32, {})
    model = build_model("timm:resnet18", len(classes), 32, args)
    paths = sorted((sample_dir / "train").glob("*/*.jpg"))[::90][:32]
    x = Normalize(IMAGENET_MEAN, IMAGENET_STD, "cpu")(torch.from_numpy(np.stack([load_resized(str(p), 32) for p in paths])))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        model.train()(x)
    run = tmp_path_factory.mktemp("timm") / "resnet18"
    run.mkdir()
    write_model(run, model.eval(), {
        "architecture": "timm:resnet18", "arch_args": args, "classes": classes, "task": "single", "image_size": 32,
        "resize": "stretch", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "temperature": 1.5,
        "thresholds": None,
    })
    return run


@pytest.mark.slow
def test_timm_resnet18_onnx_parity_via_cli(timm_run, capsys):
    from imgclf.cli import main

    assert main(["export", str(timm_run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "parity PASSED on 64 images" in out
    report = json.loads((timm_run / "model.onnx.parity.json").read_text())
    _check_report(report)
    assert "packaged CIFAR-10 sample" in report["images_from"]  # no data in this run: the fallback
    meta = read_onnx_metadata(timm_run / "model.onnx")
    assert meta["architecture"] == "timm:resnet18" and meta["temperature"] == 1.5


@pytest.mark.slow
def test_timm_resnet18_torchscript_parity(timm_run, tmp_path):
    _check_report(export(timm_run, "torchscript", tmp_path / "r18.pt", verbose=False))


def test_parity_check_catches_a_wrong_graph(tiny_run):
    from imgclf.runs import load_model

    model, meta = load_model(tiny_run)
    images, _ = parity_images_for(tiny_run, meta, 16)

    def wrong_normalisation(imgs):  # as if the export had forgotten the std division
        from imgclf.deploy.export import reference_outputs

        return reference_outputs(model, {**meta, "std": [1.0, 1.0, 1.0]}, imgs)

    report = check_parity(model, meta, images, wrong_normalisation)
    assert not report["passed"] and report["max_abs_logit_diff"] > report["tolerance"]


def test_parity_check_catches_a_baked_batch_size(tiny_run):
    from imgclf.deploy.export import reference_outputs
    from imgclf.runs import load_model

    model, meta = load_model(tiny_run)
    images, _ = parity_images_for(tiny_run, meta, 2)

    def batch_of_two_only(imgs):  # as if the trace's example batch (2) were baked into the graph
        if len(imgs) != 2:
            raise RuntimeError(f"Got invalid dimensions for input: images, index 0 Got: {len(imgs)} Expected: 2")
        return reference_outputs(model, meta, imgs)

    report = check_parity(model, meta, images, batch_of_two_only)
    assert report["n"] == 2 and report["top1_agree"] == 2  # the parity set alone would pass
    assert not report["passed"] and not report["batch_sizes"]["1"]["passed"]
    assert "Expected: 2" in report["batch_sizes"]["3"]["error"]


def test_failed_or_interrupted_export_never_replaces_the_file(tiny_run, tmp_path, monkeypatch):
    import imgclf.deploy.export as ex
    from imgclf.errors import UserError

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous, good export")
    monkeypatch.setattr(ex, "LOGIT_TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(UserError, match=r"model.onnx is unchanged, the failed export is kept as .*model\.failed\.onnx"):
        export(tiny_run, "onnx", out, parity_images=4, verbose=False)
    assert out.read_bytes() == b"the previous, good export"
    failed = json.loads((tmp_path / "model.failed.onnx.parity.json").read_text())
    assert not failed["passed"] and failed["file"] == str(tmp_path / "model.failed.onnx")
    assert read_onnx_metadata(tmp_path / "model.failed.onnx")["classes"][0] == "airplane"
    assert (tmp_path / "model.failed.onnx.json").exists() and not (tmp_path / "model.onnx.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx", "model.failed.onnx.json",
                                                          "model.failed.onnx.parity.json", "model.onnx"]

    def interrupted(wrapped, example, path, opset, xmeta):
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(tiny_run, "onnx", tmp_path / "new.onnx", verbose=False)
    assert not [p for p in tmp_path.iterdir() if "new" in p.name]


def test_export_user_errors(tiny_run, tmp_path):
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="unknown export format"):
        export(tiny_run, "tflite")
    for n in (0, -5):
        with pytest.raises(UserError, match="--parity-images must be >= 1"):
            export(tiny_run, "onnx", tmp_path / "p.onnx", parity_images=n)
    assert not (tmp_path / "p.onnx").exists()  # refused before anything is written
    with pytest.raises(UserError, match="is a directory"):
        export(tiny_run, "torchscript", tmp_path)
    with pytest.raises(UserError, match="no such run folder"):
        export(tmp_path / "missing", "onnx")
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(b"not onnx")
    with pytest.raises(UserError, match="not a readable ONNX file|no imgclf metadata"):
        read_onnx_metadata(bogus)


def test_export_out_must_match_the_format_and_be_writable(tiny_run, tmp_path, monkeypatch):
    import errno
    import os

    from imgclf.errors import UserError

    # a TorchScript zip named .onnx (or an ONNX named .pt) only fails later, obscurely, in serve
    for fmt, name, hint in [("torchscript", "x.onnx", "x.torchscript.pt"), ("onnx", "x.pt", "x.onnx"),
                            ("onnx", "x.pth", "x.onnx"), ("onnx", "x.torchscript", "x.onnx"),
                            ("onnx", "m.torchscript.pt", "m.onnx")]:
        with pytest.raises(UserError, match=rf"is for .*--format is {fmt}: name it {re.escape(hint)}") as e:
            export(tiny_run, fmt, tmp_path / name)
        assert "\n" not in str(e.value) and not (tmp_path / name).exists()
    assert not list(tmp_path.iterdir())

    # a folder that cannot take a file is an I/O error, said before any work, not an opset problem
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(UserError, match="cannot write there"):
        export(tiny_run, "onnx", tmp_path / "afile" / "x.onnx")
    if os.path.isdir("/proc"):
        with pytest.raises(UserError, match=r"--out /proc/x.onnx: cannot write there") as e:
            export(tiny_run, "onnx", "/proc/x.onnx")
        assert "opset" not in str(e.value)

    # the disk failing during the export (full, gone read-only) is reported as what it is
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[2]))

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    with pytest.raises(UserError, match=r"I/O error, No space left on device") as e:
        export(tiny_run, "onnx", tmp_path / "y.onnx", parity_images=4, verbose=False)
    assert "opset" not in str(e.value) and not [p for p in tmp_path.iterdir() if "y.onnx" in p.name]


def test_out_never_overwrites_a_run_file_and_needs_a_suffix(tiny_run, tmp_path):
    from imgclf.cli import main
    from imgclf.errors import UserError

    before = {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()}
    for name in ("model.safetensors", "model.json", "best.safetensors", "last.pt", "config.yaml", "metrics.csv",
                 "metrics.json", "summary.json"):
        fmt = "torchscript" if name.endswith(".pt") else "onnx"
        with pytest.raises(UserError, match=rf"is the run's own {re.escape(name)}.*would overwrite it") as e:
            export(tiny_run, fmt, tiny_run / name, verbose=False)
        assert "\n" not in str(e.value)
    # the same file reached by another spelling of its path (.., a symlink) is still the run's own
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(UserError, match="run's own model.safetensors"):
        export(tiny_run, "onnx", other / ".." / ".." / tiny_run.relative_to(tmp_path.parent) / "model.safetensors")
    (tmp_path / "link").symlink_to(tiny_run)
    with pytest.raises(UserError, match="run's own model.json"):
        export(tiny_run, "onnx", tmp_path / "link" / "model.json")
    assert {p.name: p.stat().st_mtime_ns for p in tiny_run.iterdir()} == before

    # no suffix: the file would not be recognised as either format (serve refuses it), and RUN/model
    # would put its sidecar on RUN/model.json
    for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
        with pytest.raises(UserError, match=rf"has no suffix: name it plainmodel{re.escape(suffix)} \(--format {fmt} takes"):
            export(tiny_run, fmt, tmp_path / "plainmodel")
    assert main(["export", str(tiny_run), "--out", str(tiny_run / "model")]) == 2
    assert not (tiny_run / "model").exists() and not list(tmp_path.glob("plainmodel*"))
    # the same name in a folder that is not a run is the user's: refused for its suffix only, as before
    with pytest.raises(UserError, match="is for torchscript"):
        export(tiny_run, "onnx", tmp_path / "last.pt")


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_opset_is_refused_with_torchscript(tiny_run, tmp_path, capsys):
    from imgclf.cli import main
    from imgclf.errors import UserError

    with pytest.raises(UserError, match="--opset is for --format onnx.*drop --opset"):
        export(tiny_run, "torchscript", tmp_path / "t.torchscript.pt", opset=17)
    assert main(["export", str(tiny_run), "--format", "torchscript", "--opset", "13",
                 "--out", str(tmp_path / "t.torchscript.pt")]) == 2
    err = capsys.readouterr().err
    assert "--opset is for --format onnx" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
    # without --opset, torchscript exports as before (the option's default is "not given")
    assert main(["export", str(tiny_run), "--format", "torchscript", "--parity-images", "4",
                 "--out", str(tmp_path / "t.torchscript.pt")]) == 0
    assert (tmp_path / "t.torchscript.pt").exists()


def test_a_model_that_cannot_be_moved_in_leaves_its_old_companions(tiny_run, tmp_path, monkeypatch):
    """A file that cannot be replaced (immutable, or a folder gone read-only) must not end up
    beside a sidecar and parity figures of another model."""
    import os
    import shutil

    import imgclf.deploy.export as ex
    from imgclf.errors import UserError

    other = tmp_path / "other-run"  # a second run: its export's metadata names another source_run
    other.mkdir()
    for f in ("model.json", "model.safetensors"):
        shutil.copy(tiny_run / f, other / f)
    out = tmp_path / "served.onnx"
    export(tiny_run, "onnx", out, parity_images=4, verbose=False)
    sidecar, parity = tmp_path / "served.onnx.json", tmp_path / "served.onnx.parity.json"
    first = (out.read_bytes(), sidecar.read_text(), parity.read_text())
    assert json.loads(first[1])["source_run"] == str(tiny_run.resolve())

    real_replace = os.replace

    def refusing(target):  # os.replace, refused for one destination (as for `chattr +i target`)
        def replace(src, dst):
            if str(dst) == str(target):
                raise PermissionError(1, "Operation not permitted", str(dst))
            return real_replace(src, dst)
        return replace

    monkeypatch.setattr(ex.os, "replace", refusing(out))  # the model cannot be replaced
    with pytest.raises(UserError, match="I/O error, Operation not permitted"):
        export(other, "onnx", out, parity_images=4, verbose=False)
    assert (out.read_bytes(), sidecar.read_text(), parity.read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        ["served.onnx", "served.onnx.json", "served.onnx.parity.json"])

    monkeypatch.setattr(ex.os, "replace", refusing(sidecar))  # the model moves in, its sidecar does not
    with pytest.raises(UserError, match="I/O error"):
        export(other, "onnx", out, parity_images=4, verbose=False)
    assert read_onnx_metadata(out)["source_run"] == str(other.resolve())
    for companion in (sidecar, parity):  # none left describing the model that was replaced
        assert not companion.exists() or str(other.resolve()) in companion.read_text()


def test_source_run_is_the_absolute_run_path(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_run.parent)
    export(tiny_run.name, "onnx", tmp_path / "rel.onnx", parity_images=4, verbose=False)
    assert read_onnx_metadata(tmp_path / "rel.onnx")["source_run"] == str(tiny_run.resolve())
    assert json.loads((tmp_path / "rel.onnx.json").read_text())["source_run"] == str(tiny_run.resolve())


def _onnx_with_metadata(path, props: dict) -> None:
    """A trivial (Identity) ONNX file carrying the given metadata entries."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["probs"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, [None, 4, 4, 3])],
                              [helper.make_tensor_value_info("probs", TensorProto.UINT8, [None, 4, 4, 3])])
    model = helper.make_model(graph)
    for k, v in props.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))


def test_damaged_onnx_metadata_is_a_one_line_error(tmp_path, capsys):
    from imgclf.cli import main
    from imgclf.errors import UserError

    good = {"classes": ["a", "b"], "image_size": 4, "resize": "stretch", "mean": [0.5] * 3, "std": [0.25] * 3,
            "task": "single"}
    f = tmp_path / "m.onnx"
    _onnx_with_metadata(f, {"imgclf": json.dumps(good)})
    assert read_onnx_metadata(f) == good
    cases = [("{not json", "not valid JSON"), ("[1, 2]", "not an object"),
             (json.dumps({k: v for k, v in good.items() if k != "image_size"}), "no image_size"),
             (json.dumps({k: v for k, v in good.items() if k not in ("mean", "std")}), "no mean, std"),
             (json.dumps({**good, "classes": []}), "classes"), (json.dumps({**good, "image_size": "big"}), "image_size"),
             (json.dumps({**good, "std": [1, 2]}), "std"), (json.dumps({**good, "resize": "zoom"}), "resize policy")]
    for value, what in cases:
        _onnx_with_metadata(f, {"imgclf": value})
        with pytest.raises(UserError, match=rf"m\.onnx: damaged imgclf metadata.*{what}") as e:
            read_onnx_metadata(f)
        assert "\n" not in str(e.value)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["serve", str(f), "--port", "0", "--threads", "1"]) == 2
        # the failed server gave the process its thread count back: left at 1, every later test
        # in the session ran on one core
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert "damaged imgclf metadata" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unfinished_run_is_not_said_to_have_stopped(tiny_run, tmp_path):
    import shutil

    from imgclf.errors import UserError

    run = tmp_path / "training"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    (run / "last.pt").write_bytes(b"a checkpoint")
    with pytest.raises(UserError) as e:
        export(run, "onnx")
    msg = str(e.value)
    assert "stopped before the end" in msg and f"imgclf train --resume {run}" in msg
    assert "before its first checkpoint" not in msg
    # while a process trains there (holds its lock) it is said to be training, not to have stopped
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import time; from imgclf.runs import hold_run; "
                               f"hold_run({str(run)!r}); print('held', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (run / "last.pt").unlink()  # before its first checkpoint, too
        with pytest.raises(UserError, match=r"is still training \(another process holds it\)"):
            export(run, "onnx")
    finally:
        holder.kill()
        holder.wait()
