"""JSON Schema checks of answers (a routed request's `json_schema`, a tool's parameters).

Schemas come from clients, so compiling one must never make the server fetch a URL: validators are
built over a `referencing` registry whose retrieval refuses, and a `$ref` that leaves the schema
(anything but a fragment, or an `$id` the schema itself defines) is refused up front by name. A
schema is checked against its metaschema once and its validator kept in a bounded LRU cache keyed by
its canonical JSON, so a client sending the same schema with every request pays for it once.

An answer is valid when it is one JSON document that the schema accepts; a single Markdown code
fence around it (```json ... ```) is allowed, since chat models write one unasked. A schema that
asks for nothing (`true`, `{}`) accepts every answer, JSON or not.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from specdec.errors import InvalidRequestError

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's canonical JSON; larger ones are refused
CACHE_SIZE = 256  # compiled validators kept


@dataclass(frozen=True)
class Verdict:
    valid: bool
    error: str | None = None  # why not: "not JSON: ...", or the schema's complaint and where


class SchemaCache:
    """Compiled validators by schema, at most `size` of them (least recently used dropped)."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self._lock = threading.Lock()
        self._validators: OrderedDict[str, Any] = OrderedDict()

    def validator(self, schema: Any, field: str = "json_schema") -> Any:
        """The validator of `schema`, compiled on first use; InvalidRequestError naming `field`
        for a schema that is not one, too large, or refers outside itself."""
        try:
            key = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(field, f"not a JSON document ({e})") from None
        if len(key) > MAX_SCHEMA_BYTES:
            raise InvalidRequestError(field, f"{len(key)} bytes; the limit is {MAX_SCHEMA_BYTES}")
        with self._lock:
            found = self._validators.get(key)
            if found is not None:
                self._validators.move_to_end(key)
                return found
        compiled = compile_schema(schema, field)
        with self._lock:
            self._validators[key] = compiled
            while len(self._validators) > self.size:
                self._validators.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._validators)


def compile_schema(schema: Any, field: str = "json_schema") -> Any:
    """A validator for `schema` (its `$schema` dialect, draft 2020-12 by default)."""
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError
    from referencing import Registry
    from referencing.exceptions import NoSuchResource

    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(
            field, f"a JSON Schema is an object (or true / false), got {type(schema).__name__}"
        )
    _refuse_outside_refs(schema, field)
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequestError(field, f"not a valid JSON Schema at {where}: {e.message}") from None

    def refuse(uri: str) -> Any:
        raise NoSuchResource(ref=uri)

    return cls(schema, registry=Registry(retrieve=refuse))


def check_json(text: str, validator: Any) -> Verdict:
    """Whether `text` is one JSON document `validator` accepts."""
    if validator.schema is True or validator.schema == {}:
        return Verdict(True)
    try:
        document = json.loads(unfenced(text))
    except (ValueError, RecursionError) as e:  # nested past the parser's depth: not JSON we can read
        return Verdict(False, f"not JSON: {e}")
    return check_document(document, validator)


def check_document(document: Any, validator: Any) -> Verdict:
    """Whether the parsed JSON `document` is one `validator` accepts (its first error, by path)."""
    from referencing.exceptions import Unresolvable

    try:
        error = next(iter(sorted(validator.iter_errors(document), key=lambda e: e.path)), None)
    except Unresolvable as e:  # a reference that passed the up-front check but names nothing
        return Verdict(False, f"the schema's reference does not resolve: {e}")
    if error is None:
        return Verdict(True)
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return Verdict(False, f"at {where}: {error.message}")


def unfenced(text: str) -> str:
    """The answer without one Markdown code fence around it (```json ... ```)."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) >= 6:
        body = body[3:-3]
        first, _, rest = body.partition("\n")
        if first.strip().lower() in ("", "json"):
            body = rest
    return body


def _refuse_outside_refs(schema: Any, field: str) -> None:
    ids, refs = set(), []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("$id", "$anchor") and isinstance(value, str):
                    ids.add(value.rstrip("#"))
                if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                    refs.append((value, f"{path}/{key}"))
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    for ref, where in refs:
        base = ref.split("#", 1)[0]
        if base and base not in ids:
            raise InvalidRequestError(
                field,
                f"{where.lstrip('/')} = {ref!r} refers outside the schema; remote references are not "
                "fetched (inline the definition under $defs)",
            )
