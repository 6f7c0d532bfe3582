"""Export a run to ONNX or TorchScript with normalisation and calibration inside, and prove it still agrees.

The exported graph takes what a deployment can produce without imgclf: uint8 RGB images, NHWC,
already resized to the model's ``image_size`` with the recorded ``resize`` policy (resizing is
data-dependent and lives outside the graph; the metadata's ``resize_details`` says how, size
included). Inside the graph: uint8 -> float, (x/255 - mean)/std, the network, then
``logits / temperature`` through softmax (single-label) or sigmoid (multi-label). Outputs:
``logits`` (raw) and ``probs``. Both formats refuse other input: onnxruntime by the declared input
type and shape, the TorchScript module by its own check (``CheckedInput``).

Every export runs a parity check on real images: exported vs PyTorch (both fp32, no autocast),
same top-1 for every image and logits within ``LOGIT_TOLERANCE`` (relative to the largest
reference logit), also at batch sizes 1 and 3 (the trace's example batch is 2, so a batch size
baked into the graph cannot pass). The figures are printed and saved as ``FILE.parity.json``.

The files are written under temporary names beside ``FILE`` and moved into place only once
parity passed: a failed export never replaces ``FILE`` (the default serving path) and is kept as
``NAME.failed.SUFFIX`` for inspection; an interrupted one leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgclf.data.images import (
    _DRAFT_MARGIN,
    _REDUCING_GAP,
    ALPHA_BACKGROUND,
    LETTERBOX_FILL,
    RESAMPLE,
    RESIZE_POLICIES,
    SIXTEEN_BIT_RULE,
    BadImage,
    load_resized,
    resize_rgb,
)
from imgclf.deploy import DEFAULT_OPSET, FORMATS, PARITY_IMAGES  # noqa: F401  (imgclf.deploy.export.FORMATS as before)
from imgclf.errors import UserError
from imgclf.paths import write_problem
from imgclf.runs import load_model, read_meta

EXPORT_FORMAT = "imgclf.export/1"
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TRACE_BATCH = 2  # the example batch the graph is traced with
CHECK_BATCHES = (1, 3)  # batch sizes other than TRACE_BATCH every export is also checked at
# fp32 vs fp32 through different kernels: differences are ~1e-5 of the logit scale; 1e-3 of it
# leaves room for kernel-order rounding but catches any real preprocessing or graph mistake.
LOGIT_TOLERANCE = 1e-3
META_KEY = "imgclf"  # the whole metadata as one JSON value; each field also has its own key


class Preprocessed(nn.Module):
    """uint8 NHWC RGB (already resized) -> (logits, calibrated probabilities)."""

    def __init__(self, model: nn.Module, mean, std, temperature: float, multilabel: bool):
        super().__init__()
        self.model = model
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        # same folded multiply-add as imgclf.data.augment.Normalize, so training and export agree
        self.register_buffer("scale", (1.0 / std_t).view(1, 3, 1, 1))
        self.register_buffer("shift", (-torch.tensor(mean, dtype=torch.float32) * 255.0 / std_t).view(1, 3, 1, 1))
        self.inv_temperature = 1.0 / float(temperature or 1.0)
        self.multilabel = multilabel

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        logits = self.model(x)
        scaled = logits * self.inv_temperature
        probs = torch.sigmoid(scaled) if self.multilabel else torch.softmax(scaled, dim=1)
        return logits, probs


class CheckedInput(nn.Module):
    """The TorchScript export's entry point: refuses what the traced graph would silently take.

    A traced graph keeps no shape or dtype checks (onnxruntime enforces the ONNX input's declared
    uint8 and H x W x 3; a TorchScript module enforces nothing): a 64x64 image, or float x/255,
    went through the convolutions and the global pooling and came out as confident, wrong
    probabilities. Scripted, not traced, so the check stays in the saved module; the batch size is
    left free."""

    def __init__(self, traced: nn.Module, size: int):
        super().__init__()
        self.traced = traced
        self.size = size

    def forward(self, images: torch.Tensor):
        s = self.size
        if (images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != s or images.shape[2] != s
                or images.shape[3] != 3):
            # TorchScript's str() of a dtype is its enum number: name the likely ones
            kind = "uint8"
            if images.dtype == torch.float32:
                kind = "float32"
            elif images.dtype == torch.float64:
                kind = "float64"
            elif images.dtype == torch.float16:
                kind = "float16"
            elif images.dtype == torch.bfloat16:
                kind = "bfloat16"
            elif images.dtype == torch.int64:
                kind = "int64"
            elif images.dtype == torch.int32:
                kind = "int32"
            elif images.dtype == torch.bool:
                kind = "bool"
            elif images.dtype != torch.uint8:
                kind = "non-uint8"
            shape = " x ".join([str(d) for d in images.shape])
            raise ValueError(f"imgclf model input must be uint8 RGB pixels (0-255, not x/255) of shape N x {s} x {s} "
                             f"x 3, resized to {s}x{s} as the metadata's resize_details says; got {kind} {shape}")
        return self.traced(images)


# What imgclf.data.images does, for a deployment that has to reproduce it without imgclf. The
# values come from that module's constants; the prose describes its code.
RESIZE_RULES = {
    "stretch": "resize to size x size, aspect ratio ignored",
    "crop": "scale so the shorter side is size, keep the centred size x size square: the source box is the "
            "centred square of side min(w, h) at ((w - side) / 2, (h - side) / 2), fractional, resampled in one pass",
    "letterbox": "scale so the longer side is size (scale = size / max(w, h), new side = max(1, round(side * scale))), "
                 "paste centred at ((size - new_w) // 2, (size - new_h) // 2) on a size x size canvas of the fill colour",
}


def resize_details(policy: str, size: int | None = None) -> dict[str, Any]:
    """How to turn a decoded image into the graph's input, enough to do it without imgclf: the
    graph takes ``size`` x ``size`` pixels, and another interpolation or crop changes answers."""
    out: dict[str, Any] = {"policy": policy}
    if size is not None:  # the target, so this entry alone says what to produce
        out["size"] = [size, size]
        out["output"] = f"uint8 RGB, {size} x {size} x 3 (HWC) per image, stacked into N x {size} x {size} x 3"
    return out | {
        "rule": RESIZE_RULES.get(policy, "unknown policy"),
        "interpolation": RESAMPLE.name.lower(),
        "interpolation_detail": f"PIL Image.resize(..., Image.Resampling.{RESAMPLE.name}, reducing_gap={_REDUCING_GAP:g}): "
                                f"a shrink by more than {_REDUCING_GAP:g}x first does an integer box reduction",
        "jpeg_draft": f"JPEGs are decoded at reduced DCT scale (PIL Image.draft, down to 1/8 a side) while keeping at "
                      f"least {_DRAFT_MARGIN:g}x the size the picture is resampled to (stretch: S x S; crop and letterbox: the "
                      f"whole image scaled as the policy scales it, e.g. 640x428 letterboxed to 224: 224x150); other "
                      f"formats decode at full size. The geometry "
                      f"(letterbox size, crop box) is the full image's: a reduced decode whose side was rounded up "
                      f"is resampled from box (0, 0, width / k, height / k), k its reduction",
        "letterbox_fill": [LETTERBOX_FILL] * 3,
        "letterbox_position": "centred; the odd pixel of padding goes to the bottom/right",
        "crop": "centre (no resize before the crop; one resample of the centred square, whose box may start "
                "at half a pixel)",
        "exif_orientation": "applied (EXIF Orientation tag 2-8, PIL ImageOps.exif_transpose) before resizing",
        "alpha_background": list(ALPHA_BACKGROUND),
        "alpha": "RGBA/LA/PA and palette or tRNS transparency are composited on the alpha_background colour",
        "sixteen_bit": SIXTEEN_BIT_RULE,
        "float": "[0, 1] -> round(x * 255); [0, 255] -> round(x); otherwise min-max stretched to 0..255",
        "frames": "the first frame of animated / multi-page files",
        "other_modes": "1, L, P, CMYK, YCbCr, LAB, ... -> RGB with PIL Image.convert('RGB')",
    }


def export_metadata(meta: dict[str, Any], run_dir: Path, how: str) -> dict[str, Any]:
    multilabel = meta.get("task") == "multilabel"
    size = int(meta["image_size"])
    temperature = float(meta.get("temperature") or 1.0)
    from imgclf import __version__

    return {
        "format": EXPORT_FORMAT,
        "architecture": meta["architecture"],
        "classes": list(meta["classes"]),
        "task": meta.get("task", "single"),
        "image_size": size,
        "resize": meta["resize"],
        "resize_details": resize_details(meta["resize"], size),
        "mean": list(meta["mean"]),
        "std": list(meta["std"]),
        "temperature": temperature,
        "thresholds": meta.get("thresholds"),
        "input": {
            "name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB", "shape": ["batch", size, size, 3],
            "preprocessing_outside_graph": f"decode to RGB and resize to {size}x{size} with policy "
                                           f"'{meta['resize']}', {RESAMPLE.name.lower()} (imgclf.data.images."
                                           "load_resized; every detail in resize_details): the graph does not "
                                           "resize",
            "preprocessing_in_graph": "uint8 -> float32, (x / 255 - mean) / std; then softmax or sigmoid of "
                                      "logits / temperature (the probs output)",
        },
        "outputs": {
            "logits": "raw logits, before temperature",
            "probs": f"{'sigmoid' if multilabel else 'softmax'}(logits / temperature), temperature={temperature:g}",
        },
        "source_run": str(Path(run_dir).resolve()),  # absolute: names the run wherever the file is served from
        "exported_with": how,
        "imgclf_version": __version__,
    }


def default_out(run_dir: Path, fmt: str) -> Path:
    return run_dir / f"model{SUFFIX[fmt]}"


def failed_out(out: Path, fmt: str) -> Path:
    """Where an export that failed parity is kept: model.onnx -> model.failed.onnx."""
    suffix = SUFFIX[fmt] if out.name.lower().endswith(SUFFIX[fmt]) and out.name != SUFFIX[fmt] else out.suffix
    return out.with_name(out.name[: len(out.name) - len(suffix)] + ".failed" + suffix)


def _describes(companion: Path, xmeta: dict, report: dict) -> bool:
    """Whether a sidecar or parity file already holds what this export wrote (moved in place)."""
    try:
        return json.loads(companion.read_text()) in (xmeta, report)
    except (OSError, ValueError):
        return False


def _companions(path: Path) -> tuple[Path, Path]:
    """The metadata sidecar and the parity figures of an exported file."""
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".parity.json")


# A run's own files: an --out naming one of them inside a run folder would overwrite the model
# (or its history) with the export.
RUN_FILES = ("model.safetensors", "model.json", "best.safetensors", "last.pt", "config.yaml", "metrics.csv",
             "metrics.json", "summary.json")

# Suffixes that name the other format: a TorchScript zip called .onnx (or the reverse) is only
# found out when something tries to load it, far from here. Any other suffix is the user's choice.
FOREIGN_SUFFIXES = {"onnx": (".pt", ".pth", ".torchscript"), "torchscript": (".onnx",)}


def _check_out(out: Path, fmt: str) -> None:
    """Refuse an --out that names the other format, a run's own file, has no suffix or cannot be
    written, before any work."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: give the file to write (e.g. {out / ('model' + SUFFIX[fmt])})")
    resolved = out.resolve()
    if resolved.name in RUN_FILES and (resolved.parent / "model.json").is_file():
        raise UserError(f"--out {out} is the run's own {resolved.name} in {resolved.parent}: the export would overwrite "
                        f"it; give another name (e.g. {resolved.parent / ('model' + SUFFIX[fmt])})")
    if not out.suffix:
        raise UserError(f"--out {out} has no suffix: name it {out.name + SUFFIX[fmt]} (--format {fmt} takes "
                        f"{SUFFIX[fmt]})")
    if out.suffix.lower() in FOREIGN_SUFFIXES[fmt]:
        other = "torchscript" if fmt == "onnx" else "onnx"
        stem = out.name[: -len(SUFFIX[other])] if out.name.lower().endswith(SUFFIX[other]) else out.stem
        raise UserError(f"--out {out}: a {out.suffix} name is for {other}, but --format is {fmt}: name it "
                        f"{stem + SUFFIX[fmt]} or pass --format {other}")
    # a file where a folder of the path should be: said as such, not as mkdir's "File exists"
    blocking = next((a for a in out.parents if a.exists() or a.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"--out {out}: cannot write there ({blocking} is a file, not a folder)")
    problem = write_problem(out.parent, create=True)
    if problem:
        raise UserError(f"--out {out}: cannot write there ({problem})")


def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None, *, opset: int | None = None,
           parity_images: int = PARITY_IMAGES, verbose: bool = True) -> dict[str, Any]:
    """Export ``run`` and run the parity check. Returns the parity report (with the file paths).
    ``opset``: ONNX only (None: ``DEFAULT_OPSET``).

    Raises UserError when the exported model disagrees with PyTorch: ``out`` is then left as it
    was and the failed export is kept as ``failed_out(out)`` (+ its .json and .parity.json).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}': use one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError(f"--opset is for --format onnx; a {fmt} export has no opset: drop --opset")
    opset = DEFAULT_OPSET if opset is None else opset
    if fmt == "onnx":
        low, high = opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
            # torch printed the whole half-built graph (hundreds of lines) above its one-line reason
            raise UserError(f"--opset {opset}: this torch exports ONNX opsets {low} to {high} (default {DEFAULT_OPSET})")
    if parity_images < 1:
        raise UserError(f"--parity-images must be >= 1, got {parity_images}")
    run_dir, meta = read_meta(run)
    out = Path(out) if out else default_out(run_dir, fmt)
    _check_out(out, fmt)
    model, meta = load_model(run_dir, "cpu")
    model.float().eval()
    wrapped = Preprocessed(model, meta["mean"], meta["std"], meta.get("temperature") or 1.0,
                           meta.get("task") == "multilabel").eval()
    size = int(meta["image_size"])
    example = torch.zeros(TRACE_BATCH, size, size, 3, dtype=torch.uint8)
    # written beside OUT under temporary names (same folder: os.replace is atomic) and moved into
    # place only once parity passed
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp_sidecar, tmp_parity = _companions(tmp)
    try:
        t0 = time.perf_counter()
        if fmt == "onnx":
            how = f"torch.onnx.export TorchScript-based exporter (dynamo=False), opset {opset}, dynamic batch"
            xmeta = export_metadata(meta, run_dir, how)
            _export_onnx(wrapped, example, tmp, opset, xmeta)
        else:
            how = (f"torch.jit.trace at batch {TRACE_BATCH}, dynamic batch (checked by the parity run at batch "
                   f"sizes {', '.join(map(str, CHECK_BATCHES))}); input other than uint8 N x {size} x {size} x 3 "
                   "is refused")
            xmeta = export_metadata(meta, run_dir, how)
            _export_torchscript(wrapped, example, tmp, xmeta)
        export_seconds = time.perf_counter() - t0
        tmp_sidecar.write_text(json.dumps(xmeta, indent=2))

        images, source = parity_images_for(run_dir, meta, parity_images)
        run_exported = _onnx_runner(tmp) if fmt == "onnx" else _torchscript_runner(tmp)
        report = check_parity(model, meta, images, run_exported)
        final = out if report["passed"] else failed_out(out, fmt)
        sidecar, parity_path = _companions(final)
        report.update({"format": fmt, "file": str(final), "metadata": str(sidecar), "images_from": source,
                       "export_seconds": round(export_seconds, 2), "exported_with": how})
        tmp_parity.write_text(json.dumps(report, indent=2))
        # The model first: if it cannot be moved into place, the previous export and its sidecar
        # and figures stay as they were, together. The model embeds its own metadata (what serve
        # reads); if a companion then cannot be moved, the old one (describing the replaced model)
        # is removed rather than left beside a model it does not describe.
        os.replace(tmp, final)
        try:
            os.replace(tmp_sidecar, sidecar)
            os.replace(tmp_parity, parity_path)
        except OSError:
            for p in (sidecar, parity_path):
                if p.exists() and not _describes(p, xmeta, report):
                    try:
                        p.unlink()
                    except OSError:
                        pass
            raise
    except OSError as e:  # the disk, not the exporter: a full disk or a folder gone read-only meanwhile
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"export to {out} failed: I/O error, {e.strerror or e}{where}") from None
    finally:
        for p in (tmp, tmp_sidecar, tmp_parity):  # an interrupted or failed export leaves no half-written file
            p.unlink(missing_ok=True)
    report["parity_file"] = str(parity_path)
    if report["passed"]:  # a failed attempt from before is history now
        for p in (failed_out(out, fmt), *_companions(failed_out(out, fmt))):
            p.unlink(missing_ok=True)
    if verbose:
        print(format_report(report))
    if not report["passed"]:
        bad = [b for b, r in report["batch_sizes"].items() if not r["passed"]]
        at_batch = (f", but wrong at batch size(s) {', '.join(bad)} (a batch size baked into the graph?)"
                    if bad and report["batch_sizes"][str(report["n"])]["passed"] else "")
        raise UserError(f"parity check failed: {report['top1_agree']}/{report['n']} top-1 agree, "
                        f"max |logit diff| {report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:.3g})"
                        f"{at_batch}; {out} {'is unchanged' if out.exists() else 'was not written'}, the failed "
                        f"export is kept as {final} (details in {parity_path})")
    return report


def format_report(r: dict[str, Any]) -> str:
    verdict = "PASSED" if r["passed"] else "FAILED"
    return (f"exported {r['file']} ({r['format']}, {r['export_seconds']}s)\n"
            f"parity {verdict} on {r['n']} images from {r['images_from']}: top-1 agree {r['top1_agree']}/{r['n']}, "
            f"max |logit diff| {r['max_abs_logit_diff']:.2e} (tolerance {r['tolerance']:.2e}), "
            f"max |prob diff| {r['max_abs_prob_diff']:.2e}; batch sizes "
            + ", ".join(f"{b} {'ok' if c['passed'] else 'FAILED'}" for b, c in r["batch_sizes"].items()) + "\n"
            f"metadata {r['metadata']}; parity figures {r['parity_file']}")


# --- exporters --------------------------------------------------------------------------------


def opset_range() -> tuple[int, int]:
    """The ONNX opsets torch's exporter accepts at all (past the TorchScript-based exporter's own
    maximum, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET, it only warns: opsets 21-23 exported FastNet
    correctly with torch 2.15, and the parity check says whether a file is right)."""
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(c.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # another torch layout: the range this module was checked with
        return 7, 23


@contextlib.contextmanager
def _native_output_held():
    """Hold what native code writes to file descriptors 1 and 2 meanwhile: when an op has no ONNX
    form at the opset asked for, torch's C++ prints the whole half-built graph (hundreds of lines)
    to stdout before raising its one-line reason. Let through when the block succeeds (nothing is
    expected then), dropped when it raises (the UserError says why)."""
    import sys
    import tempfile

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors (an embedded interpreter): nothing to hold
        yield
        return
    failed = False
    with tempfile.TemporaryFile() as held:
        try:
            os.dup2(held.fileno(), 1)
            os.dup2(held.fileno(), 2)
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if not failed:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def _export_onnx(wrapped: nn.Module, example: torch.Tensor, out: Path, opset: int, xmeta: dict) -> None:
    import onnx

    # The TorchScript-based exporter: the dynamo exporter needs onnxscript (not a dependency of
    # ours) and buys nothing here; this one handles padding='same', exact GELU (as Erf) and
    # AdaptiveMaxPool2d(1) (a MaxPool over the fixed feature map) of FastNet and timm's CNNs.
    with warnings.catch_warnings(), _native_output_held():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings are noise here
        try:
            torch.onnx.export(
                wrapped, (example,), str(out), dynamo=False, opset_version=opset,
                input_names=["images"], output_names=["logits", "probs"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}},
                do_constant_folding=True,
            )
        except OSError:
            raise  # writing the file failed: an I/O error, reported as one by export(), not an opset problem
        except Exception as e:  # an op the exporter cannot express is the user's architecture choice
            raise UserError(f"ONNX export of {xmeta['architecture']} failed at opset {opset}: "
                            f"{str(e).splitlines()[0][:300]} (try another --opset or --format torchscript)") from None
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    entries = {META_KEY: xmeta, **{k: xmeta[k] for k in ("classes", "task", "image_size", "resize", "resize_details",
                                                          "mean", "std", "temperature", "thresholds", "input",
                                                          "outputs")}}
    for key, value in entries.items():
        p = proto.metadata_props.add()
        p.key, p.value = key, json.dumps(value)
    proto.producer_name = "imgclf"
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        # torch wrote an op the opset does not have (Erf, exact GELU's, before opset 9): a traceback before
        raise UserError(f"ONNX export of {xmeta['architecture']} at opset {opset} is not valid ONNX: "
                        f"{str(e).strip().splitlines()[0][:300]} (try a higher --opset; the default is "
                        f"{DEFAULT_OPSET})") from None
    onnx.save(proto, str(out))


def _export_torchscript(wrapped: nn.Module, example: torch.Tensor, out: Path, xmeta: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(wrapped, (example,), check_trace=False)
        except Exception as e:
            raise UserError(f"TorchScript trace of {xmeta['architecture']} failed: "
                            f"{str(e).splitlines()[0][:300]} (try --format onnx)") from None
        checked = torch.jit.script(CheckedInput(traced, int(example.shape[1])).eval())
        checked = torch.jit.freeze(checked)
        torch.jit.save(checked, str(out), _extra_files={"imgclf.json": json.dumps(xmeta)})


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata an imgclf export embeds (onnx protobuf, no code is executed)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:200]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise UserError(f"{path}: no imgclf metadata in this ONNX file: export it with 'imgclf export RUN --format onnx'")
    damaged = f"{path}: damaged imgclf metadata (the '{META_KEY}' entry)"
    again = "export the run again with 'imgclf export RUN --format onnx'"
    try:
        meta = json.loads(props[META_KEY])
    except ValueError as e:
        raise UserError(f"{damaged}: not valid JSON ({e}); {again}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{damaged}: a JSON {type(meta).__name__}, not an object; {again}")
    problem = _metadata_problem(meta)
    if problem:
        raise UserError(f"{damaged}: {problem}; {again}")
    return meta


def _metadata_problem(meta: dict[str, Any]) -> str | None:
    """What makes the metadata unusable for serving (None: nothing)."""
    lacking = [k for k in ("classes", "image_size", "resize", "mean", "std") if k not in meta]
    if lacking:
        return f"no {', '.join(lacking)}"
    classes, size = meta["classes"], meta["image_size"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "classes is not a non-empty list of names"
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"image_size {size!r} is not a positive integer"
    if meta["resize"] not in RESIZE_POLICIES:
        return f"unknown resize policy {meta['resize']!r} (expected one of {', '.join(RESIZE_POLICIES)})"
    for key in ("mean", "std"):
        v = meta[key]
        if (not isinstance(v, list) or len(v) != 3
                or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)):
            return f"{key} {v!r} is not a list of 3 numbers"
    if meta.get("task") not in (None, "single", "multilabel"):
        return f"unknown task {meta.get('task')!r}"
    return None


def _onnx_runner(path: Path):
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # an opset or op this onnxruntime does not have: no parity check is possible
        raise UserError(f"onnxruntime {ort.__version__} cannot load the exported model "
                        f"({str(e).strip().splitlines()[0][:300]}); try another --opset (default {DEFAULT_OPSET})") from None

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = sess.run(["logits", "probs"], {"images": images})
        return logits, probs

    return run


def _torchscript_runner(path: Path):
    # our own file, just written; torch.jit.load reads TorchScript's archive, not arbitrary pickles
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": we load what we saved
        mod = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, probs = mod(torch.from_numpy(images))
        return logits.numpy(), probs.numpy()

    return run


# --- parity -----------------------------------------------------------------------------------


@torch.no_grad()
def reference_outputs(model: nn.Module, meta: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch model the way evaluate/predict run it, but fp32 (no autocast)."""
    from imgclf.data.augment import Normalize

    x = Normalize(meta["mean"], meta["std"], "cpu")(torch.from_numpy(images))
    logits = model.float().eval()(x.contiguous()).float()
    scaled = logits / float(meta.get("temperature") or 1.0)
    probs = torch.sigmoid(scaled) if meta.get("task") == "multilabel" else torch.softmax(scaled, 1)
    return logits.numpy(), probs.numpy()


def check_parity(model: nn.Module, meta: dict, images: np.ndarray, run_exported) -> dict[str, Any]:
    ref_logits, ref_probs = reference_outputs(model, meta, images)
    got_logits, got_probs = run_exported(np.ascontiguousarray(images))
    diff = np.abs(got_logits.astype(np.float64) - ref_logits)
    tol = LOGIT_TOLERANCE * max(1.0, float(np.abs(ref_logits).max()))
    agree = int((got_logits.argmax(1) == ref_logits.argmax(1)).sum())
    n = len(images)
    # the same images again at batch sizes other than the trace's: a graph with the example's batch
    # size baked in fails here even when the parity set happens to be that size
    batches = {str(n): {"max_abs_logit_diff": float(diff.max()), "passed": bool(diff.max() <= tol)}}
    for b in CHECK_BATCHES:
        if str(b) in batches:
            continue
        idx = np.arange(b) % n
        try:
            got_b, _ = run_exported(np.ascontiguousarray(images[idx]))
            got_b = np.asarray(got_b, dtype=np.float64)
            if got_b.shape != ref_logits[idx].shape:
                raise ValueError(f"logits of shape {got_b.shape}, expected {ref_logits[idx].shape}")
            d = float(np.abs(got_b - ref_logits[idx]).max())
            batches[str(b)] = {"max_abs_logit_diff": d, "passed": bool(d <= tol)}
        except Exception as e:  # e.g. onnxruntime or TorchScript refusing the shape
            batches[str(b)] = {"error": (str(e).splitlines() or [type(e).__name__])[0][:300], "passed": False}
    return {
        "n": n,
        "top1_agree": agree,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref_logits).max()),
        "max_abs_prob_diff": float(np.abs(got_probs.astype(np.float64) - ref_probs).max()),
        "tolerance": tol,
        "tolerance_rule": f"max |logit diff| <= {LOGIT_TOLERANCE:g} * max(1, max |reference logit|); fp32 both sides",
        "batch_sizes": batches,
        "passed": bool(agree == n and all(r["passed"] for r in batches.values())),
    }


def parity_images_for(run_dir: Path, meta: dict, n: int = PARITY_IMAGES) -> tuple[np.ndarray, str]:
    """``n`` real images at the model's size: the run's own test (else val/train) data, else the
    packaged CIFAR-10 sample (resized; fine for checking arithmetic, whatever the model's classes)."""
    size, policy = int(meta["image_size"]), meta["resize"]
    try:
        arr, origin = _run_images(run_dir, n, size, policy)
        if len(arr):
            return arr, origin
    except (UserError, OSError, ValueError, KeyError):
        pass
    from imgclf.sample import sample_dir

    paths = sorted((sample_dir() / "test").glob("*/*.jpg"))
    pick = [paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)]
    return np.stack([load_resized(str(p), size, policy) for p in pick]), "the packaged CIFAR-10 sample (test)"


def _run_images(run_dir: Path, n: int, size: int, policy: str) -> tuple[np.ndarray, str]:
    import yaml

    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    data = (cfg or {}).get("test_data") or (cfg or {}).get("data")
    if not data or not Path(str(data)).exists():  # never download ('cifar10') just to check parity
        return np.zeros((0,)), ""
    from imgclf.data.cache import cache_root
    from imgclf.data.sources import load_source
    from imgclf.evaluate.calibrate import READ_OPTIONS

    # read as training read it: a planar pixel CSV without its layout is refused, and the parity
    # check fell back to the CIFAR sample
    opts = {k: cfg[k] for k in READ_OPTIONS if (cfg or {}).get(k) is not None}
    src = load_source(str(data), val_split=0.0, cache_dir=cache_root(), **opts)
    name, split = next((k, s) for k, s in (("test", src.test), ("val", src.val), ("train", src.train)) if s is not None)
    idx = np.linspace(0, len(split) - 1, min(n, len(split))).astype(int)
    out = []
    for i in idx:
        try:
            if split.images is not None:
                out.append(resize_rgb(np.ascontiguousarray(split.images[i]), size, policy))
            else:
                out.append(load_resized(split.paths[i], size, policy))
        except BadImage:
            continue
    return (np.stack(out) if out else np.zeros((0,))), f"{data} ({name} split)"
