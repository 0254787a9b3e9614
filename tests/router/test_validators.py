"""JSON Schema checks of answers: valid and invalid answers, bad schemas refused by name, no remote
reference is ever fetched, and validators are compiled once per schema in a bounded cache."""

from __future__ import annotations

import http.server
import threading

import pytest

from specdec.errors import InvalidRequestError
from specdec.router.validators import MAX_SCHEMA_BYTES, SchemaCache, check_json

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_answers_that_fit_and_answers_that_do_not():
    v = SchemaCache().validator(PERSON)
    assert check_json('{"name": "John", "age": 31}', v).valid
    assert check_json('```json\n{"name": "John", "age": 31}\n```', v).valid  # a fence chat models add
    assert check_json('  \n{"name": "Wei", "age": 0}\n', v).valid
    verdict = check_json('{"name": "John", "age": -1}', v)
    assert not verdict.valid and verdict.error.startswith("at age: -1 is less than the minimum of 0")
    assert "'age' is a required property" in check_json('{"name": "John"}', v).error
    assert check_json('{"name": "John", "age": 31} and more', v).error.startswith("not JSON")
    assert check_json("Sure! Here it is.", v).error.startswith("not JSON")
    for anything in (True, {}):  # schemas that ask for nothing accept every answer
        assert check_json("{}", SchemaCache().validator(anything)).valid
        assert check_json("not JSON at all", SchemaCache().validator(anything)).valid


@pytest.mark.parametrize(
    "schema,message",
    [
        ({"type": "strnig"}, r"json_schema: not a valid JSON Schema at type: 'strnig' is not valid"),
        ({"properties": {"a": {"minimum": "zero"}}}, r"not a valid JSON Schema at properties/a/minimum"),
        ([1, 2], "a JSON Schema is an object"),
        ({"x": float("nan")}, "json_schema: not a JSON document"),
        ({"enum": ["x" * MAX_SCHEMA_BYTES]}, f"the limit is {MAX_SCHEMA_BYTES}"),
    ],
)
def test_bad_schemas_are_refused_by_name(schema, message):
    with pytest.raises(InvalidRequestError, match=message):
        SchemaCache().validator(schema)


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # the stdlib handler's name for it
        type(self).hits += 1
        body = b'{"type": "string"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_references_are_never_fetched():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s.json"
        for schema in (
            {"$ref": url},
            {"properties": {"a": {"$ref": url + "#/x"}}},
            {"$schema": "https://json-schema.org/draft/2020-12/schema", "items": {"$dynamicRef": url}},
        ):
            with pytest.raises(
                InvalidRequestError, match="refers outside the schema; remote references are not fetched"
            ):
                SchemaCache().validator(schema)
        assert _Counting.hits == 0
    finally:
        server.shutdown()
    # Local references work: fragments and the schema's own embedded resources.
    local = {
        "$defs": {"age": {"type": "integer"}, "item": {"$id": "item.json", "type": "string"}},
        "properties": {"age": {"$ref": "#/$defs/age"}, "tag": {"$ref": "item.json"}},
    }
    v = SchemaCache().validator(local)
    assert check_json('{"age": 3, "tag": "x"}', v).valid and not check_json('{"age": "3"}', v).valid


def test_validators_are_compiled_once_per_schema_and_the_cache_is_bounded(monkeypatch):
    import specdec.router.validators as validators

    compiled = []
    real = validators.compile_schema
    monkeypatch.setattr(
        validators, "compile_schema", lambda s, f="json_schema": compiled.append(s) or real(s, f)
    )
    cache = SchemaCache(size=2)
    first = cache.validator(PERSON)
    assert cache.validator(dict(reversed(list(PERSON.items())))) is first  # same schema, keys reordered
    assert len(compiled) == 1
    cache.validator({"type": "string"})
    cache.validator({"type": "integer"})
    assert len(cache) == 2
    assert cache.validator(PERSON) is not first and len(compiled) == 4  # evicted, compiled again
