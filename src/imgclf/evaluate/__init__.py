"""Metrics, figures, reports, explanations and calibration of trained runs.

``imgclf.evaluate(run, data=None, *, tta=None, device="auto", out=None, progress=True,
cache_dir=None)`` is also the public evaluation function (:func:`imgclf.api.evaluate`): a
sub-package and a function cannot share the name ``imgclf.evaluate``, so the package is callable
and forwards to the function, and ``import imgclf.evaluate.metrics`` keeps working.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from imgclf.api import evaluate

        return evaluate(*args, **kwargs)

    @property
    def __signature__(self):  # what inspect.signature and a notebook's help show for imgclf.evaluate
        import inspect

        from imgclf.api import evaluate

        return inspect.signature(evaluate)


sys.modules[__name__].__class__ = _CallablePackage
