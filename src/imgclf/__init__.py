"""imgclf: train, evaluate, tune, explain, export and serve image classifiers.

``imgclf.train(data="photos/", epochs=20)`` trains a run; ``imgclf.load(run).predict(...)``
classifies files, PIL images, numpy arrays or torch tensors; ``imgclf.evaluate(run, data)`` scores
a run. Bad input raises :class:`imgclf.UserError` (one line). ``imgclf.train(..., callbacks=[...])``
takes :class:`imgclf.Callback` objects (or any object with some of its hooks, e.g. on_epoch_end).
``imgclf.sweep("study.yaml")`` runs a hyperparameter study as ``imgclf sweep`` does and returns a
:class:`imgclf.SweepResult` (best_params, best_value, study_dir, the Optuna study).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "predict", "load", "sweep", "TrainResult", "Classifier", "SweepResult", "Callback",
           "UserError", "__version__"]

# Resolved on first use (PEP 562): imgclf.api imports torch (~1.5 s), which every `imgclf` command
# would pay at start-up, --help included, since the command line imports this package first.
# imgclf.evaluate is the sub-package, made callable as imgclf.api.evaluate (see its __init__): were it
# the function, `import imgclf.evaluate.metrics as m` would look up .metrics on the function and fail
_PUBLIC = {"train": "imgclf.api", "predict": "imgclf.api", "load": "imgclf.api", "TrainResult": "imgclf.api",
           "Classifier": "imgclf.api", "UserError": "imgclf.errors", "Callback": "imgclf.engine.callbacks",
           "sweep": "imgclf.tune.api", "SweepResult": "imgclf.tune.api"}


def __getattr__(name: str):
    if name in _PUBLIC:
        module = importlib.import_module(_PUBLIC[name])
        # all of a module's names at once, so each is looked up here only once
        globals().update({k: getattr(module, k) for k, m in _PUBLIC.items() if m == module.__name__})
        return globals()[name]
    if not name.startswith("_"):  # sub-modules by attribute, as after an eager import: imgclf.errors.UserError
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
