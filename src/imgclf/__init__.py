"""imgclf: train, evaluate, tune, explain, export and serve image classifiers."""

from imgclf.api import evaluate, load, predict, train

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "predict", "load", "__version__"]
