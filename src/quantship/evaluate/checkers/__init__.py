"""Output checkers keyed by name: code, math, json, qa, exact, contains, refusal, regex.

    from quantship.evaluate.checkers import check, checker_names
    check("math", "The answer is 0.5", {"reference": "1/2"})  # CheckResult(passed=True, ...)
"""

from . import maths, programs, structured, text  # noqa: F401  (registers the checkers)
from .base import CheckResult, check, checker_names, get_checker, register_checker

__all__ = ["CheckResult", "check", "checker_names", "get_checker", "register_checker"]
