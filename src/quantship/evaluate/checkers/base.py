"""Checker protocol and registry.

A checker is a function `check(output: str, item) -> CheckResult`. `item` is a
`quantship.evaluate.suites.Item` (any object with the attributes the checker reads:
`answers`, `reference`, `schema`, `tests`, `entry_point`, `pattern`, `prompt`, `meta`).
Checkers register themselves by name; suites and user JSONL refer to them by that name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

CheckFn = Callable[[str, Any], "CheckResult"]

_REGISTRY: dict[str, CheckFn] = {}


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    detail: str = ""

    def __post_init__(self):
        if not isinstance(self.passed, bool):
            raise TypeError(f"CheckResult.passed must be a bool, got {type(self.passed).__name__}")


def register_checker(*names: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator: register a check function under one or more names."""
    if not names:
        raise ValueError("register_checker needs at least one name")

    def deco(fn: CheckFn) -> CheckFn:
        for name in names:
            if name in _REGISTRY and _REGISTRY[name] is not fn:
                raise ValueError(f"checker {name!r} is already registered to {_REGISTRY[name].__module__}."
                                 f"{_REGISTRY[name].__name__}; pick another name")
            _REGISTRY[name] = fn
        return fn

    return deco


def checker_names() -> list[str]:
    return sorted(_REGISTRY)


def get_checker(name: str) -> CheckFn:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown checker {name!r}; valid checkers: {', '.join(checker_names())}") from None


def check(name: str, output: str, item) -> CheckResult:
    """Run the checker registered as `name`."""
    return get_checker(name)(output, item)


def attr(item, name: str, default=None):
    """Read an item field (attribute or mapping key), so plain dicts work in tests too."""
    if isinstance(item, dict):
        return item.get(name, default)
    return getattr(item, name, default)
