"""``imgclf.sweep``: a hyperparameter study from Python, as ``imgclf sweep`` runs it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.errors import UserError


@dataclass
class SweepResult:
    """What a study holds after the sweep: its folder (trials/<n>, study.yaml; the report is
    ``imgclf sweep-report STUDY_DIR``), the Optuna study, and its best trial (None while no trial
    has completed). ``summary`` is the JSON line ``imgclf sweep`` prints."""

    study_dir: Path
    study: Any
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def best_params(self) -> dict[str, Any] | None:
        return self.summary.get("best_params")

    @property
    def best_value(self) -> float | None:
        return self.summary.get("best_value")

    @property
    def best_trial(self) -> int | None:
        return self.summary.get("best_trial")

    @property
    def best_run(self) -> Path | None:
        """The best trial's run folder (``imgclf.load(result.best_run)``)."""
        n = self.best_trial
        return None if n is None else self.study_dir / "trials" / str(n)


def sweep(study: str | Path | dict, *, workers: int = 1, storage: str | None = None, n_trials: int | None = None,
          timeout: float | str | None = None, data=None,
          directory: str | Path | None = None) -> SweepResult:
    """Run (or resume) the study in ``study``, a YAML file or its mapping, as ``imgclf sweep``
    does; the keyword arguments are its flags (``timeout``: seconds, or '20m', '1.5h'). A sweep in
    which no trial finished raises UserError (the command exits 1); Ctrl-C stops it with the
    running trial queued again (KeyboardInterrupt), and calling this again resumes it."""
    from imgclf.config import parse_seconds
    from imgclf.tune import sweep as sw

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers must be a whole number of at least 1, got {workers!r}")
    if isinstance(timeout, str):
        try:
            timeout = float(timeout)
        except ValueError:
            try:
                timeout = parse_seconds(timeout)
            except ValueError as e:
                raise UserError(f"timeout {timeout!r}: {e}") from None
    if data is not None and not isinstance(data, str | os.PathLike):
        from imgclf.api import _arrays_as_files

        # data=(x, y) as train takes it: str() of the arrays was 'File name too long' with 6 KB of numbers.
        # Saved as the base would save them: into its cache_dir, its classes naming index labels
        # (else the trials took those names for --classes and refused them, not in 0, 1, 2, ...)
        base = study.get("base") if isinstance(study, dict) else _file_base(Path(study))
        base = base if isinstance(base, dict) else {}
        data = _arrays_as_files({"data": data, **{k: base[k] for k in ("classes", "cache_dir")
                                                  if base.get(k) is not None}})["data"]
    if not isinstance(study, dict):
        study = Path(study)
    elif isinstance(study.get("base"), dict):
        from imgclf.api import _arrays_as_files

        # base: {data: (x_train, y_train)}, as imgclf.train takes arrays: saved once into the cache and
        # named by path, which every trial (and a resumed study) reads; the study's copy turned the
        # arrays into their printed text, refused with the whole array in the message
        study = {**study, "base": _arrays_as_files(study["base"])}
    spec = sw.load_spec(study, storage=storage, n_trials=n_trials, timeout=timeout,
                        data=None if data is None else str(data),
                        directory=None if directory is None else str(directory))
    given = {k: v for k, v in (("workers", workers if workers != 1 else None), ("storage", storage and sw._redact(storage)),
                               ("n_trials", n_trials), ("timeout", timeout), ("data", data),
                               ("directory", directory)) if v is not None}
    first = repr(str(Path(study).resolve())) if isinstance(study, Path) else "{...}"
    again = f"imgclf.sweep({', '.join([first, *(f'{k}={v!r}' for k, v in given.items())])})"
    summary = sw.run_study(spec, workers=workers, again=again)
    if summary.get("error"):
        raise UserError(summary["error"])
    return SweepResult(spec.study_dir, sw.open_study(spec, heartbeat=False), summary)


def _file_base(path: Path) -> dict | None:
    """The ``base:`` of a study file, or None where it cannot be read (load_spec says why)."""
    import yaml

    try:
        return (yaml.safe_load(path.read_text()) or {}).get("base")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
