"""Imbalanced CIFAR-10: does --class-weights balanced / --sampler balanced help the rare class?

Builds a training folder (symlinks) with PER_CLASS images of nine classes and one rare class at
2% of the data, trains fastnet three times (no weighting, balanced class weights, balanced
sampler; same seed and budget) and tests on the full, balanced CIFAR-10 test set. Prints one
JSON line: the rare class's test recall, balanced accuracy and top-1 of each run.

    python benchmarks/imbalance_cpu.py                 # ../shared/datasets/cifar10-jpeg.tar.gz
    python benchmarks/imbalance_cpu.py --data /tmp/data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cifar_root(data: str | None, tmp: Path) -> Path:
    if data:
        return Path(data)
    tar = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
    with tarfile.open(tar) as t:
        t.extractall(tmp / "cifar", filter="data")
    return next(p.parent for p in (tmp / "cifar").rglob("train") if (p.parent / "test").is_dir())


def make_imbalanced(root: Path, out: Path, rare: str, per_class: int, fraction: float) -> dict:
    """train/<class> with ``per_class`` images, ``rare`` with ``fraction`` of the total; full test/."""
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    n_rare = round(fraction * per_class * (len(classes) - 1) / (1 - fraction))
    counts = {}
    for c in classes:
        files = sorted((root / "train" / c).glob("*.jpg"))[: n_rare if c == rare else per_class]
        (out / "train" / c).mkdir(parents=True)
        for f in files:
            os.symlink(f.resolve(), out / "train" / c / f.name)
        counts[c] = len(files)
    os.symlink((root / "test").resolve(), out / "test")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 JPEG folder with train/ and test/ (default: the shared tarball)")
    ap.add_argument("--rare", default="deer")
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.02)
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import imgclf

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        os.environ.setdefault("IMGCLF_CACHE", str(tmp / "cache"))
        counts = make_imbalanced(cifar_root(args.data, tmp), tmp / "imb", args.rare, args.per_class, args.fraction)
        out = {"benchmark": "imbalance_cpu", "rare_class": args.rare, "train_counts": counts,
               "rare_fraction": round(counts[args.rare] / sum(counts.values()), 4), "epochs": args.epochs,
               "test_images": None}
        for label, opts in (("none", {}), ("class_weights_balanced", {"class_weights": "balanced"}),
                            ("sampler_balanced", {"sampler": "balanced"})):
            t0 = time.perf_counter()
            res = imgclf.train(data=str(tmp / "imb"), epochs=args.epochs, seed=args.seed, project=str(tmp / "runs"),
                               name=label, progress=False, tensorboard=False, **opts)
            m = res.test
            rare = next(r for r in m["per_class"] if r["class"] == args.rare)
            out["test_images"] = m["n"]
            out[label] = {"rare_recall": round(rare["recall"], 4), "rare_precision": round(rare["precision"], 4),
                          "balanced_accuracy": round(m["balanced_accuracy"], 4), "top1": round(m["top1"], 4),
                          "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{label}: {out[label]}", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
