"""Data-parallel training on CPU: throughput of 1 vs 2 gloo processes, and whether they agree.

Trains the same BatchNorm-free plain CNN (no dropout, no random augmentation, fp32) with the same
global batch and seed in 1 process and with ``devices=2``, then prints one JSON line:

    {"images_per_s_1": ..., "images_per_s_2": ..., "speedup": ..., "wall_s_1": ..., "wall_s_2": ...,
     "max_weight_diff": ..., "threads_per_process_2": ...}

images_per_s is the last epoch's training rate of all processes together (the first epoch pays
for start-up); wall_s includes process start, cache and evaluation. On a 2-core machine expect
little gain: each of the 2 processes gets 1 thread instead of 1 process getting 2. The point is that
it runs and matches: float rounding differs between one all-reduced sum and one local sum, and the
optimizer carries that difference forward, so max_weight_diff grows with the steps (< 1e-4 after the
few steps of tests/test_distributed.py; 0.014 after these 3 epochs (~35 steps), with top-1 0.310 vs
0.313 on 2 cores). See docs/distributed.md.

Usage: python benchmarks/ddp_cpu.py [--data DIR] [--epochs 3] [--batch-size 256]
(default data: the packaged CIFAR-10 sample, 3,000 train images)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="class-folder data set (default: the packaged CIFAR-10 sample)")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import imgclf
    from imgclf.engine.distributed import cpu_cores
    from imgclf.sample import sample_dir

    data = args.data or str(sample_dir())
    out: dict = {"data": Path(data).name, "cores": cpu_cores(), "batch_size": args.batch_size, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="imgclf-ddp-bench-") as tmp:
        weights = {}
        for n in (1, 2):
            t0 = time.perf_counter()
            res = imgclf.train(data=data, model="plaincnn", epochs=args.epochs, batch_size=args.batch_size,
                               model_args={"batchnorm": False, "dropout": 0.0, "dense_dropout": 0.0},
                               precision="fp32", flip=False, translate=0, device="cpu", devices=n,
                               cache_dir=str(Path(tmp) / "cache"), project=str(Path(tmp) / f"p{n}"),
                               tensorboard=False, progress=False)
            out[f"wall_s_{n}"] = round(time.perf_counter() - t0, 1)
            out[f"images_per_s_{n}"] = round(res.history[-1]["images_per_s"], 1)
            out[f"top1_{n}"] = round(res.test["top1"], 4) if res.test else None
            from safetensors.numpy import load_file

            weights[n] = load_file(str(res.run_dir / "model.safetensors"))
        out["threads_per_process_2"] = max(1, out["cores"] // 2)
        out["speedup"] = round(out["images_per_s_2"] / out["images_per_s_1"], 3)
        out["max_weight_diff"] = float(max(np.abs(weights[1][k] - weights[2][k]).max() for k in weights[1]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
