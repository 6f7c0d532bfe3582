"""Learning-rate schedules as a factor of the peak lr per optimizer step.

Step-wise (not epoch-wise) so fractional epochs, warm-up and resumption are exact.
'plateau' is epoch-driven and lives in callbacks.ReduceOnPlateau; here it is constant.
"""

from __future__ import annotations

import math


def lr_factor(
    kind: str,
    step: int,
    total: int,
    *,
    warmup: int = 0,
    start: float = 0.0,
    end: float = 0.0,
    steps_per_epoch: int = 1,
    step_epochs: float = 30,
    gamma: float = 0.1,
    progress: float | None = None,
) -> float:
    """``progress``: the decay's position (0 to 1) when the caller tracks it, as a re-planned run
    does; by default the fraction of the steps after the warm-up."""
    total = max(total, 1)
    if warmup > 0 and step < warmup:
        return start + (1.0 - start) * step / warmup
    t = progress if progress is not None else min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "onecycle" or kind == "linear":
        return 1.0 + (end - 1.0) * t
    if kind == "cosine":
        return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "step":
        return gamma ** int(step // max(1, round(step_epochs * steps_per_epoch)))
    return 1.0  # constant, plateau
