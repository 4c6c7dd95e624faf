"""`math` checker: extract the final answer and compare it with the reference in sympy.

Extraction order (first that matches wins):
  1. the last `\\boxed{...}`;
  2. the text after the last "answer is" / "answer:" / "####" (first number or fraction in it);
  3. the last number in the output.
Numbers may carry thousands separators (1,000), a sign, decimals, a fraction (3/6), a LaTeX
`\\frac{a}{b}`, a leading currency sign or a trailing %. The answer and the reference are turned
into exact sympy numbers (decimals as rationals: 0.5 -> 1/2) and compared by
`simplify(a - b) == 0`, so 0.5, 1/2, 3/6 and 0.50 are all equal. Only digits, + - * / ( ) .
and spaces ever reach sympy (no names, no exponentiation), so nothing is evaluated as code.
An optional `meta["rel_tol"]` accepts |a - b| <= rel_tol * |b| for rounded answers.
"""

from __future__ import annotations

import re

import sympy

from .base import CheckResult, attr, register_checker

_NUM = r"[-+−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?%?|[-+]?\.\d+"
_NUM_RE = re.compile(_NUM)
_ANSWER_RE = re.compile(r"(?:answer\s*(?:is|=|:)|####)\s*:?\s*(.*)", re.I)
_SAFE = re.compile(r"^[0-9.+\-*/() ]{1,80}$")


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(output: str) -> str | None:
    """The final answer string of a worked solution, or None when there is no number."""
    boxed = _boxed(output)
    if boxed is not None:
        return boxed.strip()
    hits = list(_ANSWER_RE.finditer(output))
    if hits:
        tail = hits[-1].group(1)
        frac = re.search(r"\\d?frac\{[^{}]*\}\{[^{}]*\}", tail)
        m = _NUM_RE.search(tail)
        if frac and (not m or frac.start() <= m.start()):
            return frac.group(0)
        if m:
            return m.group(0)
    nums = _NUM_RE.findall(output)
    return nums[-1] if nums else None


def to_number(text: str) -> sympy.Expr:
    """Exact sympy value of an answer string; ValueError when it is not a plain number/expression."""
    s = text.strip().rstrip(".").replace("−", "-")
    s = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\(?:left|right|,|!|;|\s)", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = s.replace("$", "").replace("%", "").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("{", "(").replace("}", ")").strip()
    if not _SAFE.match(s) or not re.search(r"\d", s):
        raise ValueError(f"not a number or arithmetic expression: {text!r}")
    try:
        value = sympy.sympify(s, rational=True)
    except (sympy.SympifyError, SyntaxError, TypeError, ZeroDivisionError) as e:
        raise ValueError(f"cannot parse {text!r} as a number: {e}") from e
    if not value.is_number:
        raise ValueError(f"{text!r} is not a number")
    return value


def equivalent(a: str, b: str, *, rel_tol: float = 0.0) -> bool:
    x, y = to_number(a), to_number(b)
    if sympy.simplify(x - y) == 0:
        return True
    if rel_tol > 0:
        return abs(float(x) - float(y)) <= rel_tol * abs(float(y))
    return False


@register_checker("math")
def check_math(output: str, item) -> CheckResult:
    reference = attr(item, "reference")
    if reference is None:
        answers = attr(item, "answers") or ()
        reference = answers[0] if answers else None
    if reference is None:
        raise ValueError("the math checker needs item field 'reference' (the exact answer, e.g. \"1/2\")")
    answer = extract_answer(output)
    if answer is None:
        return CheckResult(False, "no number in the output")
    rel_tol = float((attr(item, "meta") or {}).get("rel_tol", 0.0))
    try:
        ok = equivalent(answer, str(reference), rel_tol=rel_tol)
    except ValueError as e:
        return CheckResult(False, f"answer {answer!r}: {e}")
    return CheckResult(ok, f"answer {answer!r} {'==' if ok else '!='} reference {reference!r}")
