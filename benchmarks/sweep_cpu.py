"""The example study (examples/plaincnn_cifar10_adam.yaml) under a fixed wall-clock budget, once
with its pruner (successive halving) and once without: trials finished within the budget
(complete + pruned) and the best validation accuracy of each. Prints one JSON line.

    python benchmarks/sweep_cpu.py                          # 20 minutes per mode, shared tarball
    python benchmarks/sweep_cpu.py --budget 240 --data /path/to/cifar10   # train/ and test/ folders

Each mode is one `imgclf sweep` process with the same sampler seed, killed when its budget is up;
a trial still running then does not count. The images are decoded into the cache before either
clock starts, so both modes pay only for training.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import yaml

import imgclf

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
STUDY = REPO / "examples" / "plaincnn_cifar10_adam.yaml"


def run_mode(study: dict, mode: str, tmp: Path, budget: float, env: dict) -> dict:
    from imgclf.tune import sweep

    spec_dict = {**study, "name": f"bench-{mode}", "directory": str(tmp / "studies"), "timeout": budget, "seed": 0}
    if mode == "no_pruning":
        spec_dict["pruner"] = "none"
    path = tmp / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    start = dt.datetime.now()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "sweep", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    wall = time.monotonic() - t0
    if proc.returncode not in (0, -9):
        sys.exit(f"{mode}: imgclf sweep failed:\n{err[-3000:]}")
    spec = sweep.load_spec(path)
    # a process killed before it opened its study (a very short budget) finished nothing
    started = (spec.study_dir / "study.db").exists()
    trials = sweep.open_study(spec, heartbeat=False).get_trials(deepcopy=False) if started else []
    end = start + dt.timedelta(seconds=budget)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.datetime_complete <= end]
    complete = [t for t in done if t.state.name == "COMPLETE"]
    epochs = sum(len(t.intermediate_values) for t in done)
    best = max(complete, key=lambda t: t.value, default=None)
    return {
        "trials_finished": len(done), "complete": len(complete), "pruned": len(done) - len(complete),
        "failed": sum(t.state.name == "FAIL" for t in trials), "epochs_trained": epochs,
        "best_val_acc": round(best.value, 4) if best else None,
        "best_params": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in best.params.items()} if best else None,
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--budget", type=float, default=1200, help="seconds per mode (default 20 minutes)")
    p.add_argument("--data", help="folder with train/ and test/ (default: extract the shared tarball)")
    p.add_argument("--study", default=str(STUDY), help="study YAML (default: the example)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data, caches and runs")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-sweep-bench-"))
    if not args.keep:  # each run leaves up to GBs of decoded cache behind: removed at exit
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    data = Path(args.data) if args.data else None
    if data is None:
        with tarfile.open(TARBALL) as tf:
            tf.extractall(tmp / "data", filter="data")
        data = tmp / "data"
    study = yaml.safe_load(Path(args.study).read_text())
    study["base"] = {**study["base"], "data": str(data)}
    env = {**os.environ, "IMGCLF_CACHE": str(tmp / "cache")}

    # decode the images once, before either clock starts
    t = time.perf_counter()
    imgclf.train(**{**study["base"], "epochs": 0.01}, project=str(tmp / "warm"), cache_dir=str(tmp / "cache"),
                 progress=False, tensorboard=False, final_eval=False)
    warm_s = time.perf_counter() - t

    modes = {m: run_mode(study, m, tmp, args.budget, env) for m in ("pruning", "no_pruning")}
    a, b = modes["pruning"]["trials_finished"], modes["no_pruning"]["trials_finished"]
    print(json.dumps({
        "benchmark": "sweep_cpu", "study": Path(args.study).name, "budget_s": args.budget,
        "epochs_per_trial": study["base"].get("epochs"), "pruner": study.get("pruner"),
        **modes, "finished_ratio": round(a / b, 2) if b else None, "cache_warmup_s": round(warm_s, 1),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "imgclf": imgclf.__version__,
    }))


if __name__ == "__main__":
    main()
