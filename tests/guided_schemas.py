"""The 20 JSON schemas the structured-output tests validate replies against and the guided-decoding
benchmark compiles (benchmarks/bench_guided.py): nested objects, arrays, enums, bounded numbers,
required fields, const, anyOf, patterns."""

from __future__ import annotations

from typing import Any

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def strict(schema: Any) -> Any:
    """The schema as OpenAI's strict mode wants it: no object takes properties it does not list."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.get("type") == "object":
        out.setdefault("additionalProperties", False)
    return out


SCHEMAS: list[dict[str, Any]] = [
    PERSON,
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"]},
    {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["score"],
    },
    {
        "type": "object",
        "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 60}},
        "required": ["temperature"],
    },
    {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}
        },
        "required": ["colors"],
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0}, "active": {"type": "boolean"}},
                "required": ["id", "active"],
            }
        },
        "required": ["user"],
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": 2,
        "maxItems": 4,
    },
    {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["zip"],
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "point"}, "x": {"type": "integer"}},
        "required": ["kind", "x"],
    },
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["value"],
    },
    {"enum": ["alpha", "beta", "gamma"]},
    {"type": "integer", "minimum": 100, "maximum": 999},
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 30},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["title", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -1000, "maximum": 1000},
                    "y": {"type": "number", "minimum": -1000, "maximum": 1000},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "required": ["point"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}},
        "required": ["price"],
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "maxLength": 8},
                        "qty": {"type": "integer", "minimum": 1},
                    },
                    "required": ["sku", "qty"],
                },
                "minItems": 1,
                "maxItems": 2,
            }
        },
        "required": ["items"],
    },
    {
        "type": "object",
        "properties": {"level": {"enum": [1, 2, 3]}, "label": {"enum": ["low", "high"]}},
        "required": ["level", "label"],
    },
    {"type": "boolean"},
]
SCHEMAS = [strict(s) for s in SCHEMAS]
