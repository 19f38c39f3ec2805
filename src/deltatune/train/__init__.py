"""The training pipeline: data, the one training loop, evaluation and reports.

The package is callable: ``deltatune.train(data=..., out=..., **options)`` runs a whole training job
(:func:`deltatune.train.api.train`, which the ``deltatune train`` command runs too) and returns its
report. A function named ``train`` on the ``deltatune`` package would be replaced by this subpackage
as soon as any ``deltatune.train.<module>`` is imported; making the package itself callable gives one
object under that name, whatever is imported first.
"""

import sys
import types

from .api import train as _train


class _CallablePackage(types.ModuleType):
    """The module type of :mod:`deltatune.train`: calling it runs :func:`deltatune.train.api.train`."""

    def __call__(self, *args, **kwargs):
        return _train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
