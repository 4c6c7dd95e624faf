"""Methods plug in by name. A method CHOOSES quantized values; formats store them.

Two shapes of method exist:
  - data-free weight quantizers (rtn, hqq): `quantize_weight(w, scheme, params) -> QuantizedWeight`,
    applied to each target independently;
  - calibrated pipelines (gptq, awq, smoothquant): `run(model, targets, schemes, params, calib)`
    -> {target name: QuantizedWeight}, free to transform the float model in place first;
    `schemes` maps every target's full name to its own Scheme (the spec's default scheme and
    its per-layer overrides).
Every method has a frozen params dataclass; its fields are the documented parameters and are
recorded in the artifact manifest.

Transforms (awq, smoothquant) rescale the float weights and hand them to a weight quantizer
chosen by name, with that quantizer's own params: their params dataclass derives from
TransformParams, and `make_params` takes `quantizer=NAME` plus `NAME.KEY=VALUE` entries for the
quantizer (e.g. {"quantizer": "gptq", "gptq.percdamp": 0.1}).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

from ..formats.scheme import Scheme


@dataclass(frozen=True)
class TransformParams:
    """Base of a transform's params: the weight quantizer (a registered method, by name) that
    rounds the transformed weights, and that quantizer's own params (its params dataclass)."""

    QUANTIZERS: ClassVar[tuple[str, ...]] = ("rtn", "gptq")  # the quantizers this transform composes with
    # the transform's own defaults for a quantizer's params, where they differ from the quantizer's
    QUANTIZER_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    RETIRED: ClassVar[dict[str, str]] = {}  # parameter -> how to say it now (see Method.make_params)

    quantizer: str = "rtn"
    quantizer_params: Any = None  # None: the quantizer's defaults (with QUANTIZER_DEFAULTS applied)

    def __post_init__(self) -> None:
        if self.quantizer not in self.QUANTIZERS:
            raise ValueError(f"quantizer must be one of {', '.join(self.QUANTIZERS)}, got {self.quantizer!r}")
        quantizer = get_method(self.quantizer)
        if self.quantizer_params is None:
            object.__setattr__(self, "quantizer_params",
                               quantizer.make_params(self.QUANTIZER_DEFAULTS.get(self.quantizer, {})))
        elif not isinstance(self.quantizer_params, quantizer.params_cls):
            raise ValueError(f"quantizer_params must be a {quantizer.params_cls.__name__} for quantizer "
                             f"{self.quantizer!r}, got {type(self.quantizer_params).__name__}")


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
    # the schemes a layer may get through an override (default: `supports`), e.g. smoothquant's
    # weight-only layers in a w8a8 model
    supports_override: Callable[[Scheme], bool] | None = None
    # transforms: which layers' schemes the chosen quantizer rounds (and so must support)
    quantizer_rounds: Callable[[Scheme], bool] = lambda scheme: True

    def __post_init__(self) -> None:
        if (self.quantize_weight is None) == (self.run is None):
            raise ValueError(f"method {self.name!r} must define exactly one of quantize_weight / run")

    @property
    def is_transform(self) -> bool:
        return issubclass(self.params_cls, TransformParams)

    @property
    def default_quantizer(self) -> str | None:
        return next(f.default for f in fields(self.params_cls) if f.name == "quantizer") if self.is_transform else None

    def check_scheme(self, scheme: Scheme, params=None, *, override: str | None = None) -> None:
        """Raise ValueError naming what this method takes and which methods take `scheme`.
        override: the `REGEX=SCHEME` that gave a layer this scheme (checked with supports_override)."""
        supports = (self.supports_override or self.supports) if override else self.supports
        where = f" (from --override {override})" if override else ""
        if not supports(scheme):
            _load_builtin_methods()
            takers = sorted(m.name for m in METHODS.values() if m.supports(scheme))
            takes = f"; {self.name} takes {self.schemes}" if self.schemes else ""
            raise ValueError(f"method {self.name!r} does not support scheme {scheme.name!r}{where}{takes}; "
                             f"methods that take {scheme.name}: {', '.join(takers) or 'none'}")
        quantizer = getattr(params, "quantizer", None)
        if quantizer is not None and self.quantizer_rounds(scheme) and not get_method(quantizer).supports(scheme):
            others = [q for q in self.params_cls.QUANTIZERS if get_method(q).supports(scheme)]
            raise ValueError(f"method {self.name!r}: its quantizer {quantizer!r} does not support scheme "
                             f"{scheme.name!r}{where}; quantizers of {self.name} that do: {', '.join(others) or 'none'}")

    def make_params(self, overrides: dict[str, Any] | None = None):
        """The params dataclass from `key: value` pairs. Transforms also take `quantizer` (a name)
        and `QUANTIZER.key` entries for that quantizer's own params."""
        overrides = dict(overrides or {})
        retired = getattr(self.params_cls, "RETIRED", {})
        for key in overrides:
            if key in retired:
                raise ValueError(f"method {self.name!r} has no parameter {key!r} any more: {retired[key]}")
        own = {k: v for k, v in overrides.items() if "." not in k}
        valid = {f.name for f in fields(self.params_cls)} - {"quantizer_params"}
        unknown = sorted(set(own) - valid)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no parameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        nested = {k: v for k, v in overrides.items() if "." in k}
        if not self.is_transform:
            if nested:
                raise ValueError(f"method {self.name!r} takes no quantizer, so no dotted parameter(s) "
                                 f"{', '.join(sorted(nested))}; dotted QUANTIZER.key parameters are for the "
                                 f"transforms (awq, smoothquant)")
            return self.params_cls(**own)
        return self._transform_params(own, nested)

    def _transform_params(self, own: dict[str, Any], nested: dict[str, Any]):
        cls = self.params_cls
        quantizer = own.pop("quantizer", self.default_quantizer)
        if quantizer not in cls.QUANTIZERS:
            raise ValueError(f"method {self.name!r} takes quantizer {' or '.join(cls.QUANTIZERS)}, got {quantizer!r}")
        sub: dict[str, Any] = {}
        for key, value in nested.items():
            prefix, _, name = key.partition(".")
            if prefix != quantizer:
                raise ValueError(f"method {self.name!r}: parameter {key}={value} is for quantizer {prefix!r}, but the "
                                 f"quantizer is {quantizer!r}; add --param quantizer={prefix} to use {prefix}, or "
                                 f"prefix the parameter with {quantizer}.")
            sub[name] = value
        try:
            q_params = get_method(quantizer).make_params({**cls.QUANTIZER_DEFAULTS.get(quantizer, {}), **sub})
        except ValueError as e:
            raise ValueError(f"method {self.name!r}, quantizer {quantizer!r} ({quantizer}.KEY=VALUE): {e}") from e
        return cls(**own, quantizer=quantizer, quantizer_params=q_params)


METHODS: dict[str, Method] = {}

# Shorthands: a name that stands for a method with some parameters set (recorded under the method's
# own name). `awq+gptq` is AWQ whose scaled weights are rounded by GPTQ.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"awq+gptq": ("awq", {"quantizer": "gptq"})}
_REMOVED = {"awq+rtn": "use 'awq' (its default quantizer is rtn)"}


def resolve_alias(name: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method name, params) with a shorthand expanded: ('awq+gptq', {...}) -> ('awq', {'quantizer': 'gptq', ...})."""
    if name not in ALIASES:
        return name, params
    method, implied = ALIASES[name]
    clash = {k: params[k] for k in implied if k in params and params[k] != implied[k]}
    if clash:
        raise ValueError(f"method {name!r} is {method!r} with {_pairs(implied)}; it cannot take {_pairs(clash)} "
                         f"(use --method {method} with the parameters you want)")
    return method, {**implied, **params}


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


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
        if name in ALIASES:
            raise ValueError(f"{name!r} is a shorthand for method {ALIASES[name][0]!r} with "
                             f"{_pairs(ALIASES[name][1])}; resolve it with resolve_alias()") from None
        hint = f" ({_REMOVED[name]})" if name in _REMOVED else ""
        raise ValueError(f"unknown method {name!r}{hint}; valid: {', '.join(sorted([*METHODS, *ALIASES]))}") from None


def _load_builtin_methods() -> None:
    # Importing a method module registers it; kept lazy so `import quantship` stays light.
    import importlib

    for module in ("rtn", "gptq", "awq", "smoothquant", "hqq"):
        try:
            importlib.import_module(f"quantship.methods.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"quantship.methods.{module}":
                raise
