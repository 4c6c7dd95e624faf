"""`json` checker: find a JSON object in the output and validate it against the item's schema.

Extraction: the first ```json (or bare ```) fenced block that parses, else the first `{` from
which a complete JSON value decodes (json.JSONDecoder.raw_decode), so prose around the object is
ignored. Validation: jsonschema, draft chosen by the schema's `$schema` (2020-12 by default).
A tool call is just a schema: {"name": {"const": "get_weather"}, "arguments": {...}}; see
`tool_call_schema`.
"""

from __future__ import annotations

import json
import re

import jsonschema

from .base import CheckResult, attr, register_checker

_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_json(output: str):
    """The first JSON object/array in the output; ValueError when there is none."""
    for m in _FENCE.finditer(output):
        try:
            return json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[{\[]", output):
        try:
            value, _ = decoder.raw_decode(output, m.start())
        except json.JSONDecodeError:
            continue
        return value
    raise ValueError("no JSON object found in the output")


def tool_call_schema(name: str, parameters: dict) -> dict:
    """Schema of a tool call {"name": name, "arguments": {...}} whose arguments match `parameters`."""
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def validator_for(schema: dict):
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"the item's JSON schema is itself invalid: {e.message}") from e
    return cls(schema)


@register_checker("json")
def check_json(output: str, item) -> CheckResult:
    schema = attr(item, "schema")
    if not isinstance(schema, dict):
        raise ValueError("the json checker needs item field 'schema' (a JSON Schema object)")
    try:
        value = extract_json(output)
    except ValueError as e:
        return CheckResult(False, str(e))
    errors = sorted(validator_for(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "<root>"
        return CheckResult(False, f"schema violation at {where}: {e.message}"
                                  + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    return CheckResult(True, "valid against the schema")
