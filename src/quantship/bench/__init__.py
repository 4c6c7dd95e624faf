"""Benchmarks: single stream and load on the engine, memory planner, cost.

`quantship.bench` is both this package and the API function `quantship.bench(...)`: importing a
submodule rebinds the package attribute, so the package itself is made callable and forwards to
`quantship.api.bench`.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from ..api import bench

        return bench(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
