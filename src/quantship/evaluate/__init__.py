"""Evaluation: perplexity/KLD metrics, task suites, statistics.

`quantship.evaluate` is both this package and the API function `quantship.evaluate(...)`:
importing a submodule rebinds the package attribute, so the package itself is made callable
and forwards to `quantship.api.evaluate`.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import evaluate

        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
