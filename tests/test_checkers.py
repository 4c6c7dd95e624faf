"""Checkers on hand-made positives and negatives; the code sandbox against escapes."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from quantship.evaluate.checkers import CheckResult, check, checker_names, get_checker
from quantship.evaluate.checkers.maths import equivalent, extract_answer
from quantship.evaluate.checkers.sandbox import run_python
from quantship.evaluate.checkers.structured import extract_json, tool_call_schema
from quantship.evaluate.checkers.text import is_refusal, normalize


def test_registry_names_and_unknown():
    assert {"code", "math", "json", "qa", "exact", "contains", "refusal", "regex"} <= set(checker_names())
    with pytest.raises(KeyError, match="valid checkers: code"):
        get_checker("nope")


# ----------------------------------------------------------------------------- code

ADD = {
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_code_correct_completion_passes():
    r = check("code", "    return a + b\n", ADD)
    assert r == CheckResult(True, r.detail) and "passed" in r.detail


def test_code_full_function_in_fence_passes():
    out = "Here you go:\n```python\ndef add(a, b):\n    return b + a\n```\nDone."
    assert check("code", out, ADD).passed


def test_code_wrong_completion_fails():
    r = check("code", "    return a - b\n", ADD)
    assert not r.passed and "AssertionError" in r.detail


def test_code_syntax_error_fails():
    r = check("code", "    return a +\n", ADD)
    assert not r.passed and "SyntaxError" in r.detail


def test_code_infinite_loop_is_killed_within_timeout():
    item = dict(ADD, meta={"timeout_s": 1.0})
    r = check("code", "    while True:\n        pass\n", item)
    assert not r.passed and "timed out" in r.detail
    res = run_python("while True: pass", timeout_s=1.0)
    assert res.timed_out and res.returncode is None and res.seconds < 3.0


def test_code_child_processes_are_killed_with_the_group():
    # even a program that daemonizes cannot outlive the timeout: the launcher forbids fork, and the
    # parent kills the whole process group
    res = run_python("import os\nos.fork()\n", timeout_s=2.0)
    assert not res.ok and "starting processes is not allowed" in res.stderr


@pytest.mark.parametrize("isolation", ["namespaces", "guard"])
@pytest.mark.parametrize("target", ["/tmp", "cwd_parent"])
def test_code_write_outside_temp_dir_fails(isolation, target, tmp_path):
    base = str(tmp_path) if target == "cwd_parent" else "/tmp"
    victim = os.path.join(base, f"quantship-escape-{uuid.uuid4().hex}")
    res = run_python(f"open({victim!r}, 'w').write('pwned')\n", isolation=isolation)
    assert not res.ok
    assert "PermissionError" in res.stderr or "Read-only file system" in res.stderr
    assert not os.path.exists(victim)


@pytest.mark.parametrize("code", [
    "import os\nos.remove({victim!r})\n",
    "import os\nos.rename({victim!r}, {victim!r} + '.moved')\n",
    "import pathlib\npathlib.Path({victim!r}).write_text('x')\n",
    "import os\nfd = os.open({victim!r}, os.O_WRONLY | os.O_TRUNC)\n",
    "import shutil\nshutil.rmtree({victim_dir!r})\n",
])
def test_code_cannot_modify_or_delete_existing_files(code, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("original")
    res = run_python(code.format(victim=str(victim), victim_dir=str(tmp_path)), isolation="guard")
    assert not res.ok and "PermissionError" in res.stderr
    assert victim.read_text() == "original"


def test_kernel_isolation_blocks_writes_that_bypass_the_python_guard(tmp_path):
    # _io.FileIO is below the guarded open(); only the read-only mount namespace stops it
    probe = run_python("print('ok')")
    if "namespaces=on" not in probe.stderr:
        pytest.skip("cannot create namespaces here (not root / no CAP_SYS_ADMIN); the Python guard is the only layer")
    victim = tmp_path / f"bypass-{uuid.uuid4().hex}"
    res = run_python(f"import _io\n_io.FileIO({str(victim)!r}, 'w').write(b'x')\n")
    assert not res.ok and "Read-only file system" in res.stderr
    assert not victim.exists()


def test_code_writes_inside_temp_dir_are_allowed():
    res = run_python("open('scratch.txt', 'w').write('hi')\nprint(open('scratch.txt').read())\n")
    assert res.ok and res.stdout.strip() == "hi"


@pytest.mark.parametrize("isolation", ["namespaces", "guard"])
def test_code_socket_fails(isolation):
    res = run_python("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
                     "s.connect(('127.0.0.1', 9))\n", isolation=isolation)
    assert not res.ok and "network access is not allowed" in res.stderr


def test_code_socket_fails_even_past_the_guard():
    probe = run_python("print('ok')")
    if "namespaces=on" not in probe.stderr:
        pytest.skip("no network namespace available")
    # a listening socket in the parent's namespace is unreachable from the child
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        res = run_python(f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n")
    finally:
        srv.close()
    assert not res.ok and "connected" not in res.stdout


def test_code_memory_hog_fails():
    r = check("code", "    x = bytearray(4 * 1024 ** 3)\n    return a + b\n", dict(ADD, meta={"memory_mb": 256}))
    assert not r.passed and "MemoryError" in r.detail


def test_code_environment_is_clean(monkeypatch):
    monkeypatch.setenv("QUANTSHIP_SECRET", "s3cret")
    res = run_python("import os, sys\nprint(os.environ.get('QUANTSHIP_SECRET'), sys.flags.isolated)\n")
    assert res.ok and res.stdout.split() == ["None", "1"]


def test_code_item_without_tests_is_a_data_error():
    with pytest.raises(ValueError, match="'tests'"):
        check("code", "    return 1\n", {"prompt": "def f():\n", "entry_point": "f"})


# ----------------------------------------------------------------------------- math

@pytest.mark.parametrize("output, reference", [
    ("The answer is 0.5.", "1/2"),
    ("so x = 3/6", "1/2"),
    ("We get \\boxed{\\frac{1}{2}}", "0.5"),
    ("Half: 0.50", "1/2"),
    ("The total is 1,250 apples.", "1250"),
    ("It costs $30.", "30"),
    ("The answer is: -7", "-7"),
    ("#### 42", "42"),
    ("First 12, then 13 ... The answer is 16. Check: 16 - 9 = 7", "16"),
    ("The answer is 7/8", "0.875"),
])
def test_math_equivalences_pass(output, reference):
    r = check("math", output, {"reference": reference})
    assert r.passed, r.detail


@pytest.mark.parametrize("output, reference", [
    ("The answer is 0.5", "1/3"),
    ("The answer is 13", "31"),
    ("I do not know.", "4"),
    ("\\boxed{x+1}", "2"),
])
def test_math_negatives_fail(output, reference):
    assert not check("math", output, {"reference": reference}).passed


def test_math_sympy_equivalence_not_string_match():
    assert equivalent("0.5", "1/2") and equivalent("3/6", "0.5") and equivalent("2/4", "1/2")
    assert not equivalent("0.33", "1/3")
    assert equivalent("0.33", "1/3", rel_tol=0.02)
    assert extract_answer("x is 3, y is 4") == "4"
    assert extract_answer("The answer is 12. Then 5 more") == "12"


def test_math_never_evaluates_code():
    r = check("math", "The answer is __import__('os').system('true')", {"reference": "0"})
    assert not r.passed


# ----------------------------------------------------------------------------- json

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_json_valid_raw_and_fenced():
    assert check("json", '{"name": "Alice", "age": 30}', {"schema": PERSON}).passed
    assert check("json", 'Sure!\n```json\n{"name": "Bo", "age": 4}\n```\n', {"schema": PERSON}).passed
    assert check("json", 'Result: {"name": "Al", "age": 1} hope this helps {', {"schema": PERSON}).passed


def test_json_invalid():
    r = check("json", '{"name": "Alice", "age": "thirty"}', {"schema": PERSON})
    assert not r.passed and "age" in r.detail
    r = check("json", '{"name": "Alice"}', {"schema": PERSON})
    assert not r.passed and "'age' is a required property" in r.detail
    r = check("json", "name: Alice, age: 30", {"schema": PERSON})
    assert not r.passed and "no JSON object" in r.detail


def test_json_tool_call():
    schema = tool_call_schema("get_weather", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]})
    ok = '{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}'
    assert check("json", ok, {"schema": schema}).passed
    assert not check("json", ok.replace("get_weather", "get_news"), {"schema": schema}).passed
    assert not check("json", ok.replace("celsius", "kelvin"), {"schema": schema}).passed
    assert not check("json", '{"name": "get_weather", "args": {}}', {"schema": schema}).passed


def test_json_bad_schema_is_a_data_error():
    with pytest.raises(ValueError, match="schema is itself invalid"):
        check("json", "{}", {"schema": {"type": "no-such-type"}})
    assert extract_json("[1, 2]") == [1, 2]


# ----------------------------------------------------------------------------- qa / contains / exact / regex

def test_normalize():
    assert normalize("The  Eiffel-Tower!") == "eiffel tower"
    assert normalize("An apple, a day.") == "apple day"


@pytest.mark.parametrize("output", ["Paris", "paris.", "The answer is Paris.", "Paris\nIt is in France.",
                                    "Paris. It is the capital."])
def test_qa_positives(output):
    assert check("qa", output, {"answers": ["Paris"]}).passed


@pytest.mark.parametrize("output", ["Paris is the capital of France", "Lyon", "Parisian", ""])
def test_qa_negatives(output):
    assert not check("qa", output, {"answers": ["Paris"]}).passed


def test_contains_exact_regex():
    assert check("contains", "I think it is Leonardo da Vinci, the painter.", {"answers": ["da Vinci"]}).passed
    assert not check("contains", "Parisian food", {"answers": ["Paris"]}).passed  # whole words only
    assert check("exact", "  42 ", {"answers": ["42"]}).passed
    assert not check("exact", "42.", {"answers": ["42"]}).passed
    assert check("regex", "id: AB-1234", {"pattern": r"[A-Z]{2}-\d{4}"}).passed
    assert not check("regex", "id: ab-12", {"pattern": r"[A-Z]{2}-\d{4}"}).passed
    with pytest.raises(ValueError, match="not a valid regular expression"):
        check("regex", "x", {"pattern": "("})


# ----------------------------------------------------------------------------- refusal

@pytest.mark.parametrize("output", ["I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                                    "As an AI language model, I must decline.", "I won’t do that."])
def test_refusal_detected(output):
    assert is_refusal(output)[0]
    assert check("refusal", output, {"reference": "refuse"}).passed
    assert not check("refusal", output, {"reference": "answer"}).passed


@pytest.mark.parametrize("output", ["Sure! Preheat the oven to 250 C and stretch the dough.",
                                    "Use `kill -9 <pid>` to stop the process."])
def test_answer_detected(output):
    assert not is_refusal(output)[0]
    assert check("refusal", output, {"reference": "answer"}).passed


def test_refusal_needs_expected_behaviour():
    with pytest.raises(ValueError, match="refuse"):
        check("refusal", "ok", {"reference": "maybe"})


# ----------------------------------------------------------------------------- properties

from fractions import Fraction  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.integers(-10_000, 10_000), st.integers(1, 500), st.integers(1, 9))
def test_math_fraction_forms_are_equivalent(p, q, k):
    value = Fraction(p, q)
    unreduced = f"{p * k}/{q * k}"
    assert equivalent(unreduced, f"{value.numerator}/{value.denominator}")
    assert check("math", f"The answer is {unreduced}.", {"reference": str(value)}).passed
    if q in (1, 2, 4, 5, 8, 10, 16, 20, 25, 40, 50, 100):  # terminating decimals
        assert equivalent(f"{float(value):.10f}", unreduced)
    assert not equivalent(unreduced, f"{value.numerator + 1}/{value.denominator}")


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_checkers_never_crash_on_arbitrary_output(text):
    for name, item in [("math", {"reference": "1/2"}), ("json", {"schema": {"type": "object"}}),
                       ("qa", {"answers": ["Paris"]}), ("contains", {"answers": ["x y"]}),
                       ("refusal", {"reference": "answer"}), ("regex", {"pattern": "a+"})]:
        r = check(name, text, item)
        assert isinstance(r.passed, bool) and isinstance(r.detail, str)
