"""Whether bf16 autocast is faster than fp32 on this CPU: what ``--precision auto`` follows.

The CPU flags alone do not tell. With AMX, bf16 convolutions and matmuls run on tiles: about 3x
fp32 for small convnets. Without AVX512-BF16 bf16 is emulated and much slower. In between, a CPU
with AVX512-BF16 but no AMX may go either way: on a 2-core AMD EPYC (Zen 4) bf16 trained FastNet
about twice as fast; on a 2-core Intel Xeon whose AMX the hypervisor masks it trained FastNet at
199 img/s against 351 in fp32 (32 px, batch 1024), EfficientNet-Lite0 at 25 against 52 and
ResNet-18 at 39 against 62 (128 px). So that case is timed: a small conv stack, forward and
backward, in both precisions. The answer is stored per CPU model, torch version and thread count
in the cache folder (``cpu-bf16.json``), so every later run on the machine makes the same choice
without timing again (a choice that flipped between runs would change results run to run).
``IMGCLF_CPU_BF16=1`` or ``0`` gives the answer instead: ``--devices N`` hands the parent's
answer to its processes this way, so no two ranks can decide differently.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

CACHE_FILE = "cpu-bf16.json"
ENV = "IMGCLF_CPU_BF16"
# bf16 must be this much faster to be chosen: it costs a little accuracy, so a tie goes to fp32
MARGIN = 0.85

_ANSWER: dict[str, bool] = {}


def _flag(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    return f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def timings(reps: int = 4) -> tuple[float, float]:
    """Seconds for the fastest forward+backward pass of a small channels_last conv stack (batch 64,
    32 px: FastNet's shapes) in bf16 autocast and in fp32. The two alternate, so a busy moment
    of the machine slows both."""
    # the probe must not move the run's random stream, and may be asked from inside no_grad (the
    # first Muon step) or inference_mode (predict)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.GELU(),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(128), torch.nn.GELU(),
            torch.nn.Conv2d(128, 256, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.BatchNorm2d(256), torch.nn.GELU(),
            torch.nn.AdaptiveMaxPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, 10),
        ).to(memory_format=torch.channels_last)
        x = torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        best = {True: float("inf"), False: float("inf")}
        for _ in range(reps):  # the first pass of each sets up kernels
            for bf16 in (True, False):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = net(x).float().logsumexp(1).mean()
                loss.backward()
                best[bf16] = min(best[bf16], time.perf_counter() - t0)
    return best[True], best[False]


def _cache_path() -> Path:
    from imgclf.data.cache import cache_root

    return cache_root() / CACHE_FILE


def _stored() -> dict:
    """The answers kept in the cache folder, by machine_key (empty when none or unreadable)."""
    try:
        seen = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return seen if isinstance(seen, dict) else {}


def _measure(key: str, seen: dict) -> bool:
    """Time both precisions, keep the answer beside ``seen`` (the stored ones) and return it."""
    bf16, fp32 = timings()
    pays = bf16 < MARGIN * fp32
    path = _cache_path()
    try:  # best effort: an unwritable cache only means timing again next run
        seen = {**seen, key: {"bf16": pays, "bf16_s": round(bf16, 5), "fp32_s": round(fp32, 5)}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return pays


def bf16_pays() -> bool:
    """True where bf16 autocast beats fp32 on this CPU (see the module's docstring)."""
    given = os.environ.get(ENV, "").strip()
    if given in ("0", "1"):
        return given == "1"
    if _flag("_is_amx_tile_supported"):
        return True
    if not _flag("_is_avx512_bf16_supported"):
        return False
    key = machine_key()
    if key not in _ANSWER:
        seen = _stored()
        known = seen.get(key)
        _ANSWER[key] = bool(known["bf16"]) if isinstance(known, dict) and "bf16" in known else _measure(key, seen)
    return _ANSWER[key]
