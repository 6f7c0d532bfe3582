"""The run folder: the contract between training and everything downstream.

A trained model is ``model.safetensors`` + ``model.json`` (architecture and its arguments,
classes, input size, normalisation, resize policy, calibration). Loading never unpickles.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgclf.errors import UserError
from imgclf.paths import locked_elsewhere

if TYPE_CHECKING:
    from imgclf.config import TrainConfig

MODEL_FORMAT = "imgclf.model/1"


_HELD: dict[str, int] = {}  # run folder -> the descriptor this process holds its lock on


def hold_run(run: Path) -> None:
    """Lock ``run`` for this process while it trains there: a second process that would train in
    the same folder (the same command twice, a --resume of a run still going) is refused in one
    line instead of both writing one checkpoint. flock on the folder itself, so no file is left
    behind, and the lock goes with the process however it ends (kill -9 included). Where there is
    no flock (Windows) nothing is locked. Released by release_runs."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(run)
    if key in _HELD:
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:  # unreadable: the write that follows says what is wrong
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{run} is in use: another imgclf process is training in it (wait for it, or stop it "
                        "first)") from None
    except OSError:  # a file system without locks (some NFS mounts: ENOLCK): unlocked, as before
        os.close(fd)
        return
    _HELD[key] = fd


def in_use(run: Path) -> bool:
    """Another process holds ``run`` (hold_run's lock); nothing is kept locked by asking."""
    key = os.path.realpath(run)
    return key not in _HELD and locked_elsewhere(key)


def release_runs() -> None:
    """Let go of every run folder hold_run locked."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def save_weights(model: nn.Module, path: Path) -> None:
    """``model``'s weights to ``path`` (safetensors), atomically. safetensors creates its files
    0600, so a run folder shared with a team or read by a serving account could not be loaded:
    the file gets the permissions the user's umask gives every other file of the run."""
    from safetensors.torch import save_file

    from imgclf.engine.trainer import _writing  # a full disk: one line, no temp file left

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path, tmp):
        save_file(state, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)


def write_model(run_dir: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from imgclf.engine.trainer import _writing

    save_weights(model, run_dir / "model.safetensors")
    tmp = run_dir / "model.json.tmp"
    with _writing(run_dir / "model.json", tmp):
        write_meta(run_dir, meta)


def write_meta(run_dir: Path, meta: dict[str, Any]) -> None:
    meta = {"format": MODEL_FORMAT, **{k: v for k, v in meta.items() if k != "format"}}
    tmp = run_dir / "model.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(run_dir / "model.json")


def remove_exports(run_dir: Path) -> list[Path]:
    """Delete the exported models in ``run_dir`` (imgclf export: model.onnx, model.torchscript.pt,
    their .json sidecars and parity figures, a failed export's copy): they embed the weights and
    temperature they were exported with, so after a retrain or a refit serving one would disagree
    with ``predict``. Exports elsewhere are the user's."""
    removed = []
    for f in sorted({*run_dir.glob("model.onnx*"), *run_dir.glob("model.torchscript.pt*"),
                     *run_dir.glob("model.failed*")}):
        if f.is_file():
            f.unlink()
            removed.append(f)
    return removed


def is_run(folder: Path) -> bool:
    """A folder 'imgclf train' made: its config.yaml and its weights or its resume checkpoint."""
    return (folder / "config.yaml").is_file() and ((folder / "model.json").is_file() or
                                                   (folder / "last.pt").is_file())


def check_run_data(run_dir: Path | None, cfg: TrainConfig, *, resume: bool = False,
                    keys: tuple[str, ...] = ("data", "val_data", "test_data", "images")) -> None:
    """The run's recorded data (config.yaml; local paths are stored absolute) still there: a
    folder moved since training is said as such, not as '--data X: no such file or folder' to a
    user who passed no --data."""
    for key in keys:
        v = getattr(cfg, key, None)
        if isinstance(v, str) and "://" not in v and os.path.isabs(os.path.expanduser(v)) \
                and not os.path.exists(os.path.expanduser(v)):
            where = f"config.yaml {key}: {v}"
            if resume:
                raise UserError(f"--resume {run_dir}: the data this run was trained on ({where}) is not "
                                f"there any more: put it back, or set {key}: in {run_dir / 'config.yaml'} to "
                                "where it is now")
            raise UserError(f"the data this run was trained on ({where}) is not there any more: pass --data "
                            "FOLDER")


def run_path(run: Any) -> Path:
    """A run folder as the Python API takes it: a str or path, or what ``imgclf.train`` returned
    (``imgclf.load(res)`` as well as ``imgclf.load(res.run_dir)``)."""
    run = getattr(run, "run_dir", run)
    if not isinstance(run, str | os.PathLike):
        raise UserError(f"a run is given as its folder (a str or Path, or what imgclf.train returned), "
                        f"not {type(run).__name__}")
    return Path(run)


def read_meta(run: str | Path) -> tuple[Path, dict[str, Any]]:
    run = run_path(run)
    meta_path = run / "model.json" if run.is_dir() else run.with_name("model.json")
    if not meta_path.exists():
        if not run.exists():
            raise UserError(f"{run}: no such run folder")
        if not run.is_dir():
            raise UserError(f"{run}: not a run folder (the first argument is the folder 'imgclf train' made)")
        if (run / "config.yaml").exists() and in_use(run):  # hold_run's lock: a process trains there now
            raise UserError(f"{run} is still training (another process holds it): its model.json and weights are "
                            f"written when training ends")
        from imgclf.tune.sweep import trial_advice

        advice = trial_advice(run)  # a sweep trial: its study trains it again, not train --resume
        if advice:
            raise UserError(advice)
        if (run / "last.pt").exists():
            raise UserError(f"{run} has no model.json: its training stopped before the end (resume it with "
                            f"'imgclf train --resume {run}')")
        if (run / "config.yaml").exists():
            raise UserError(f"{run} has no model.json: training stopped before its first checkpoint "
                            f"(give the same train command again: it starts over in that folder)")
        runs = sorted(e.name for e in itertools.islice(os.scandir(run), 2000)
                      if e.is_dir() and (Path(e.path) / "model.json").is_file())
        if runs:  # a project folder ('runs'): its runs' figures would look like data below
            raise UserError(f"{run}: not an imgclf run folder (no model.json); it holds run folders: name one, e.g. "
                            f"{run / runs[-1]}")
        if _looks_like_data(run):  # 'imgclf evaluate photos/' or 'predict photos/ cat.jpg': arguments swapped
            raise UserError(f"{run}: not an imgclf run folder (no model.json); it looks like a data folder: the first "
                            "argument is a run folder ('imgclf train' made it); pass data with --data (predict: "
                            "after the run folder)")
        raise UserError(f"{run}: not an imgclf run folder (no model.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON ({e})") from None
    if meta.get("format") != MODEL_FORMAT:
        raise UserError(f"{meta_path}: unknown model format {meta.get('format')!r} (expected {MODEL_FORMAT})")
    return meta_path.parent, meta


def _looks_like_data(folder: Path, depth: int = 3, budget: int = 2000) -> bool:
    """Whether ``folder`` holds images (directly, in class folders, or in train/class folders),
    looking at no more than ``budget`` entries."""
    from imgclf.data.images import IMAGE_EXTENSIONS

    seen = 0
    todo = [(folder, 0)]
    while todo:
        d, level = todo.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if seen > budget:
                return False
            if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS:
                return True
            if level + 1 < depth and e.is_dir() and not e.name.startswith("."):
                todo.append((Path(e.path), level + 1))
    return False


def load_model(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from model.json and load model.safetensors (no pickle involved)."""
    from safetensors.torch import load_file

    from imgclf.models.registry import build_model

    run_dir, meta = read_meta(run)
    lacking = [k for k in ("architecture", "classes", "image_size") if k not in meta]
    if lacking:
        raise UserError(f"{run_dir / 'model.json'} is incomplete: no {', '.join(lacking)}")
    model = build_model(meta["architecture"], len(meta["classes"]), meta["image_size"], meta.get("arch_args", {}))
    weights = run_dir / meta.get("weights", "model.safetensors")
    if not weights.exists():
        raise UserError(f"{run_dir}: weights file {weights.name} is missing")
    try:
        state = load_file(str(weights), device=str(device))
    except PermissionError:
        raise UserError(f"{weights}: permission denied (older imgclf runs wrote their weights readable "
                        f"by their owner only: 'chmod a+r {weights}')") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise UserError(f"{weights}: cannot read the weights ({str(exc).splitlines()[0][:120]}); the file is "
                        "damaged or incomplete") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not match the architecture in model.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(device).eval()
    return model, meta


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device '{name}' requested but MPS is not available on this machine")
    return dev
