"""The default recipe on a CUDA GPU through the same imgclf.train path: mean and spread of test
top-1 (with and without TTA) over several seeds, training wall seconds excluding the one-time
torch.compile warm-up (reported separately). Prints one JSON line.

    python benchmarks/cifar10_gpu.py --seeds 5            # extracts ../shared/datasets/cifar10-jpeg.tar.gz
    python benchmarks/cifar10_gpu.py --data /path/cifar10 --epochs 10
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import imgclf

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--keep", action="store_true", help="keep the temporary data, caches and runs")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cifar10_gpu.py needs a CUDA GPU (use benchmarks/cifar10_cpu.py on a CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-gpu-"))
    if not args.keep:  # each run leaves up to GBs of decoded cache behind: removed at exit
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    data = Path(args.data) if args.data else None
    if data is None:
        with tarfile.open(TARBALL) as tf:
            tf.extractall(tmp / "data", filter="data")
        data = tmp / "data"
    common = dict(data=str(data), val_split=0.0, project=str(tmp / "runs"), cache_dir=str(tmp / "cache"),
                  progress=False, tensorboard=False, compile=args.compile, epochs=args.epochs)
    # Warm-up: builds the cache and compiles the graphs once (both one-time costs).
    t = time.perf_counter()
    imgclf.train(seed=10_000, **common)
    warmup = time.perf_counter() - t
    rows = []
    for seed in range(args.seeds):
        torch.cuda.synchronize()
        res = imgclf.train(seed=seed, **common)
        no_tta = imgclf.evaluate(res.run_dir, str(data), tta=False, progress=False, cache_dir=str(tmp / "cache"))
        rows.append({"seed": seed, "train_seconds": sum(r["seconds"] for r in res.history),
                     "top1_tta": res.test["top1"], "top1": no_tta["top1"]})
    def stats(key):
        vals = [r[key] for r in rows]
        return {"mean": round(statistics.mean(vals), 4), "std": round(statistics.pstdev(vals), 4)}
    print(json.dumps({
        "benchmark": "cifar10_gpu", "device": torch.cuda.get_device_name(),
        "data": "CIFAR-10 JPEG copy (q75)", "epochs": res.config.epochs, "seeds": args.seeds,
        "train_seconds": stats("train_seconds"), "test_top1_tta": stats("top1_tta"), "test_top1": stats("top1"),
        "warmup_seconds_cache_and_compile": round(warmup, 1), "runs": rows,
    }))


if __name__ == "__main__":
    main()
