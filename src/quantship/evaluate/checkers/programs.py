"""`code` checker: run a HumanEval-style completion against its tests in the sandbox.

Item fields: `base_prompt` or else `prompt` (function signature + docstring), `tests` (defines
`check(candidate)`), `entry_point` (function name). The program executed is

    <prompt><completion>          if the output continues the function body, or
    <prompt>\n<code>              if the output (or its ```python fence) redefines the function
                                  (a HumanEval prompt ends in a docstring, so it is valid alone)
    <tests>\ncheck(<entry_point>)

and passes when it exits 0 within the timeout.
"""

from __future__ import annotations

import re

from .base import CheckResult, attr, register_checker
from .sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S, run_python

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
_CLOSED_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n.*?```", re.S | re.I)


def extract_code(output: str) -> str:
    """The first fenced code block if there is one, else the output as is."""
    m = _FENCE.search(output)
    return m.group(1) if m else output


def end_of_first_code_block(text: str) -> int | None:
    """Index just past the closing fence of the first complete code block, None if there is none.

    `extract_code` reads only the first block, so text after this index never changes what the
    `code` checker runs: generation may stop here (the first complete match in a growing text is
    the first match of any longer text with the same start).
    """
    m = _CLOSED_FENCE.search(text)
    return m.end() if m else None


def build_program(output: str, item) -> str:
    # the function stub: base_prompt when the item has one (chat prompt = instruction), else prompt
    prompt = attr(item, "base_prompt") or attr(item, "prompt") or ""
    tests = attr(item, "tests")
    entry = attr(item, "entry_point")
    if not tests or not entry:
        raise ValueError("the code checker needs item fields 'tests' (defining check(candidate)) and "
                         "'entry_point' (the function name); add them to the JSONL line")
    code = extract_code(output)
    if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
        body = f"{prompt}\n\n{code}"
    else:
        body = f"{prompt}{code}"
    return f"{body}\n\n{tests}\n\ncheck({entry})\n"


@register_checker("code")
def check_code(output: str, item) -> CheckResult:
    meta = attr(item, "meta") or {}
    program = build_program(output, item)
    res = run_python(program, timeout_s=float(meta.get("timeout_s", DEFAULT_TIMEOUT_S)),
                     memory_mb=int(meta.get("memory_mb", DEFAULT_MEMORY_MB)))
    if res.timed_out:
        return CheckResult(False, f"timed out after {res.seconds:.1f}s (killed)")
    if res.returncode != 0:
        last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        return CheckResult(False, f"exit {res.returncode}: {last[-1] if last else 'no error output'}")
    return CheckResult(True, f"tests passed in {res.seconds:.2f}s")
