"""Methods plug in by name. A method CHOOSES quantized values; formats store them.

Two shapes of method exist:
  - data-free weight quantizers (rtn, hqq): `quantize_weight(w, scheme, params) -> QuantizedWeight`,
    applied to each target independently;
  - calibrated pipelines (gptq, awq, smoothquant): `run(model, targets, scheme, params, calib)`
    -> {target name: QuantizedWeight}, free to transform the float model in place first.
Every method has a frozen params dataclass; its fields are the documented parameters and are
recorded in the artifact manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from ..formats.scheme import Scheme


@dataclass(frozen=True)
class Method:
    name: str
    params_cls: type
    needs_calibration: bool
    quantize_weight: Callable | None = None  # (w, scheme, params) -> QuantizedWeight
    run: Callable | None = None  # (model, targets, scheme, params, calib) -> dict[str, QuantizedWeight]
    supports: Callable[[Scheme], bool] = lambda scheme: True
    description: str = ""
    schemes: str = ""  # the valid schemes in words, for error messages ("w8a8 only")
    # run() takes on_quantized(name, weight) and hands each finished block's weights to it
    streams: bool = False

    def __post_init__(self) -> None:
        if (self.quantize_weight is None) == (self.run is None):
            raise ValueError(f"method {self.name!r} must define exactly one of quantize_weight / run")

    def check_scheme(self, scheme: Scheme) -> None:
        """Raise ValueError naming what this method takes and which methods take `scheme`."""
        if self.supports(scheme):
            return
        _load_builtin_methods()
        takers = sorted(m.name for m in METHODS.values() if m.supports(scheme))
        takes = f"; {self.name} takes {self.schemes}" if self.schemes else ""
        raise ValueError(f"method {self.name!r} does not support scheme {scheme.name!r}{takes}; "
                         f"methods that take {scheme.name}: {', '.join(takers) or 'none'}")

    def make_params(self, overrides: dict[str, Any] | None = None):
        overrides = dict(overrides or {})
        valid = {f.name for f in fields(self.params_cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        return self.params_cls(**overrides)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}") from None


def _load_builtin_methods() -> None:
    # Importing a method module registers it; kept lazy so `import quantship` stays light.
    import importlib

    for module in ("rtn", "gptq", "awq", "smoothquant", "hqq"):
        try:
            importlib.import_module(f"quantship.methods.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"quantship.methods.{module}":
                raise
