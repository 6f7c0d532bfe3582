"""Bounded memory: peak RSS of training on a data set 4x larger than another, both of 256x256 images.

Builds two synthetic JPEG class-folder data sets (the larger over 8 GiB of decoded pixels), then
trains one epoch on each in its own process (cache build, training, evaluation: the whole path)
and prints one JSON line:

    {"small": {"images": 12000, "decoded_gib": 2.2, "peak_rss_mib": ..., ...},
     "large": {"images": 48000, "decoded_gib": 8.8, ...}, "rss_ratio": ..., "target_met": ...}

peak_rss_mib is the training process's VmHWM (what ``ru_maxrss`` reports). It counts file-backed
pages of the memory-mapped cache that the process has touched, as well as anonymous memory;
peak_rss_anon_mib / peak_rss_file_mib split it (sampled every 50 ms, so they may miss a short
spike). cache_worker_peak_rss_mib is the largest decoding worker. Target: the larger's peak RSS
within 1.25x the smaller's and under 3 GiB.

Usage: nice -n 19 python benchmarks/memory.py [--small 12000 --large 48000 --root /tmp/imgclf-mem]
The JPEGs are a few hundred distinct images hard-linked under many names (decoding cost is what
it would be with distinct files; the pixels do not matter for memory). Everything is deleted at
the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SIZE = 256
CLASSES = 10
DISTINCT = 320


def _make_jpeg(args: tuple[int, str]) -> None:
    from PIL import Image, ImageDraw

    i, path = args
    rng = np.random.default_rng(i)
    # smooth colour noise plus a few shapes: JPEG sizes like real photos (~20 KB), not like noise
    low = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    im = Image.fromarray(low).resize((SIZE, SIZE), Image.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, SIZE - 32, 2)
        x1, y1 = x0 + rng.integers(16, 128), y0 + rng.integers(16, 128)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=fill)
    im.save(path, quality=85)


def make_dataset(root: Path, n: int, distinct: Path) -> None:
    sources = sorted(distinct.glob("*.jpg"))
    for c in range(CLASSES):
        (root / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        dst = root / "train" / f"class{c}" / f"{i:06d}.jpg"
        src = sources[(i * 7 + c) % len(sources)]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy(src, dst)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def child(data: str, project: str, cache: str, budget: float) -> None:
    """One training run; prints its own memory figures as JSON on the last line."""
    import imgclf

    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s.get(k, 0))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    res = imgclf.train(data=data, image_size=SIZE, model="plaincnn", epochs=1, batch_size=64, val_split=0.05,
                       model_args={"channels": [4, 8, 16], "convs_per_block": 1, "dense": [], "dropout": 0.0,
                                   "head": "avg"},
                       translate=0, tta=False, ram_budget=budget, cache_dir=cache, project=project,
                       progress=False, tensorboard=False)
    seconds = time.perf_counter() - t0
    done.set()
    mib = 2**20
    print(json.dumps({
        "peak_rss_mib": round(_status()["VmHWM"] / mib),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / mib),
        "peak_rss_anon_mib": round(peaks["RssAnon"] / mib),
        "peak_rss_file_mib": round(peaks["RssFile"] / mib),
        "cache_worker_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / mib),
        "seconds": round(seconds, 1),
        "train_images_per_s": round(res.history[-1]["images_per_s"], 1),
        "val_top1": round(res.test["top1"], 4) if res.test else None,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=12_000)
    ap.add_argument("--large", type=int, default=48_000)
    ap.add_argument("--root", default="/tmp/imgclf-mem")
    ap.add_argument("--ram-budget", type=float, default=0.0, help="GiB kept resident (0: both runs stream)")
    ap.add_argument("--keep", action="store_true", help="keep the data sets and caches")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "PROJECT", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.ram_budget)
        return

    root = Path(args.root)
    per_image = SIZE * SIZE * 3
    need = (args.small + args.large) * per_image * 1.05 + (1 << 30)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need:
        sys.exit(f"memory benchmark: needs {need / 2**30:.1f} GiB free under {root}, has {free / 2**30:.1f} GiB")
    try:
        distinct = root / "distinct"
        distinct.mkdir(exist_ok=True)
        from multiprocessing import Pool

        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_make_jpeg, [(i, str(distinct / f"{i:04d}.jpg")) for i in range(DISTINCT)])
        out: dict = {"image_size": SIZE, "model": "plaincnn channels 4/8/16", "batch_size": 64,
                     "ram_budget_gib": args.ram_budget}
        for label, n in (("small", args.small), ("large", args.large)):
            data = root / label
            make_dataset(data, n, distinct)
            proc = subprocess.run([sys.executable, __file__, "--ram-budget", str(args.ram_budget), "--child",
                                   str(data), str(root / "runs"), str(root / "cache")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"memory benchmark: the {label} run failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            out[label] = {"images": n, "decoded_gib": round(n * per_image / 2**30, 2), **figures}
            shutil.rmtree(root / "cache", ignore_errors=True)  # disk: one cache at a time
        ratio = out["large"]["peak_rss_mib"] / out["small"]["peak_rss_mib"]
        out["rss_ratio"] = round(ratio, 3)
        out["target_met"] = ratio <= 1.25 and out["large"]["peak_rss_mib"] < 3 * 1024
        print(json.dumps(out))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
