"""Metrics, figures, reports, explanations and calibration of trained runs.

``imgclf.evaluate(...)`` is also the public evaluation function. Importing this sub-package
makes ``imgclf.evaluate`` refer to the package, so the package itself is made callable and
forwards to :func:`imgclf.api.evaluate`: both spellings keep working whatever was imported.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from imgclf.api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
