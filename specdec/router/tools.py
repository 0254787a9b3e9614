"""Tools a routed request offers the model, the format the model is asked to call them in, and the
check of every call it makes (docs/ROUTING.md, *Tools*).

A tool is OpenAI's function tool: a name ([A-Za-z0-9_-], at most 64 characters), a description,
and a JSON Schema of its arguments (`parameters`, an object schema; absent: no arguments are
checked). A local tier is told about the tools in a system message (`tools_message`) and calls one
by writing, anywhere in its answer, one block per call:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

- the Hermes / Qwen 2.5 convention, which instruction-tuned small models have seen most. An
endpoint tier is sent the tools in OpenAI's own `tools` field and answers with `tool_calls`. Either
way every call is checked (`check_calls`): a tool the request offered, arguments that are a JSON
object, and arguments that its parameters schema accepts (through the same `SchemaCache` as
`json_schema`, so a client's schema never makes the server fetch a URL).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from specdec.errors import InvalidRequestError
from specdec.router.validators import SchemaCache, check_document

MAX_TOOLS = 64
MAX_DESCRIPTION_CHARS = 4096
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Any  # a JSON Schema of the arguments (an object schema, or True: anything)

    def openai(self) -> dict[str, Any]:
        """As OpenAI's `tools` field writes it."""
        function: dict[str, Any] = {"name": self.name, "description": self.description}
        if self.parameters is not True:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model wrote it (re-serialised from a local tier's block)
    valid: bool
    error: str | None = None  # why not


def parse_tools(raw: list[tuple[str, str, str]], schemas: SchemaCache) -> tuple[Tool, ...]:
    """The request's tools from (name, description, parameters as JSON text) triples, checked:
    InvalidRequestError naming `tools[i].<field>` for a bad name, a name given twice, a description
    too long, parameters that are not JSON or not a valid object schema."""
    if len(raw) > MAX_TOOLS:
        raise InvalidRequestError("tools", f"{len(raw)} tools; the limit is {MAX_TOOLS}")
    tools: list[Tool] = []
    for i, (name, description, parameters) in enumerate(raw):
        at = f"tools[{i}]"
        if not _NAME.match(name):
            raise InvalidRequestError(
                f"{at}.name", f"{name!r}: 1 to 64 characters of letters, digits, '_' and '-'"
            )
        if any(t.name == name for t in tools):
            raise InvalidRequestError(f"{at}.name", f"{name!r} is given twice")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequestError(
                f"{at}.description", f"{len(description)} characters; the limit is {MAX_DESCRIPTION_CHARS}"
            )
        schema: Any = True
        if parameters:
            try:
                schema = json.loads(parameters)
            except (ValueError, RecursionError) as e:
                raise InvalidRequestError(f"{at}.parameters", f"not valid JSON ({e})") from None
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise InvalidRequestError(
                    f"{at}.parameters", 'a JSON Schema of the arguments object ({"type": "object", ...})'
                )
            schemas.validator(schema, f"{at}.parameters")  # compiled (and checked) once, here
        tools.append(Tool(name, description, schema))
    return tuple(tools)


def tools_message(tools: tuple[Tool, ...]) -> str:
    """The system text that tells a local model what it may call, and how."""
    listed = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)
    return (
        "You may call the following tools. To call one, write a block like this for each call, "
        "with the arguments as a JSON object:\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>\n'
        f"Tools:\n{listed}"
    )


def call_block(name: str, arguments: Any) -> str:
    """One call, written in the format the model is asked for."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}</tool_call>"


def without_calls(text: str) -> str:
    """The answer's text around its call blocks (OpenAI's `content` beside `tool_calls`)."""
    return _CALL.sub("", text).strip()


def with_tools(messages: list[dict[str, str]], tools: tuple[Tool, ...]) -> list[dict[str, str]]:
    """The messages a local tier reads: the tools' description joins the system message (the first
    message, made one when there is none)."""
    if not tools:
        return messages
    text = tools_message(tools)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def calls_in(text: str) -> list[tuple[str, Any]]:
    """The calls a local tier's answer makes, in order: (name, arguments) of each block's JSON; a
    block that is not such JSON comes back as ("", its text), which `check_calls` refuses."""
    calls: list[tuple[str, Any]] = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except (ValueError, RecursionError):
            calls.append(("", block.strip()))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(("", block.strip()))
            continue
        calls.append((call["name"], call.get("arguments", {})))
    return calls


def openai_calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    """The calls an endpoint's chat message makes (`tool_calls`: function name, arguments as JSON
    text), as `calls_in` gives them."""
    calls: list[tuple[str, Any]] = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            calls.append(("", json.dumps(call)))
            continue
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            # Text that is not JSON stays text: check_calls says it is not a JSON object.
            with contextlib.suppress(ValueError, RecursionError):
                arguments = json.loads(arguments)
        calls.append((function["name"], arguments))
    return calls


def check_calls(
    calls: list[tuple[str, Any]], tools: tuple[Tool, ...], schemas: SchemaCache
) -> tuple[ToolCall, ...]:
    """Each call's verdict: a tool the request offered, with arguments its parameters accept."""
    by_name = {t.name: t for t in tools}
    out: list[ToolCall] = []
    for name, arguments in calls:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        tool = by_name.get(name)
        if tool is None:
            known = ", ".join(by_name) or "none were offered"
            error = f"not a tool call of the form asked for: {text[:80]!r}" if not name else (
                f"{name!r} is not an offered tool (offered: {known})"
            )  # fmt: skip
            out.append(ToolCall(name, text, False, error))
            continue
        if not isinstance(arguments, dict):
            out.append(ToolCall(name, text, False, f"{name}: the arguments are not a JSON object"))
            continue
        verdict = check_document(arguments, schemas.validator(tool.parameters, "tools.parameters"))
        out.append(ToolCall(name, text, verdict.valid, None if verdict.valid else f"{name}: {verdict.error}"))
    return tuple(out)
