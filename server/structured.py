"""Structured outputs and tool calls (OpenAI's `response_format`, `tools` + `tool_choice`).

`response_format` json_object / json_schema becomes a grammar that the engine enforces while it
decodes (model/grammar.py). A forced call (`tool_choice` "required", or a named function) is
generated under a grammar too: a named function's arguments under its parameters schema; with
"required" among several tools, `{"name":...,"arguments":...}` under the union of their
schemas (the name first, so that a stream can announce it before the arguments). Earlier calls
and tool results in the history are rendered in GLM-4's format: an assistant turn
`name\\n{arguments}` per call, a tool's result as an `observation` turn. No HTTP here: errors
are ServingError (400).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from xllm.model.grammar import GrammarError, json_schema_grammar
from xllm.server.errors import ServingError
from xllm.server.protocol import NamedToolChoice, ResponseFormat, ToolDefinition

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# a generated call among several tools, up to its arguments (compact JSON, the name first)
_CALL_PREFIX = re.compile(r'\{"name":"([a-zA-Z0-9_-]+)","arguments":')


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar a response_format asks for (None: plain text); a 400 naming what cannot be
    enforced."""
    if response_format is None or response_format.type == "text":
        return None
    schema = None
    if response_format.type == "json_schema":
        if response_format.json_schema is None or response_format.json_schema.schema_ is None:
            raise ServingError("response_format json_schema needs 'json_schema.schema'", 400)
        schema = response_format.json_schema.schema_
    try:
        return json_schema_grammar(schema)
    except GrammarError as exc:
        raise ServingError(f"response_format: {exc}", 400) from None


@dataclass(frozen=True)
class ToolPlan:
    """A forced tool call: the grammar of the generated text and, with one function, its name
    (None: the text names the function, `{"name":...,"arguments":...}`)."""

    grammar: str
    name: str | None

    def parse(self, text: str) -> tuple[str, str] | None:
        """(function name, arguments as JSON text) of a complete generation; None when the text
        is not a whole call (the generation ran out of tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.name is not None:
            return self.name, text
        return value["name"], json.dumps(value["arguments"], separators=(",", ":"))


def tool_plan(
    tools: list[ToolDefinition] | None,
    tool_choice: str | NamedToolChoice | None,
    response_format: ResponseFormat | None,
) -> ToolPlan | None:
    """What a request's tools ask of the generation: a forced call, or None (no tools, or
    tool_choice "none"). A 400 for what cannot be honoured, naming it."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ServingError("'tool_choice' needs 'tools'", 400)
        return None
    if tool_choice == "none":
        return None
    if tool_choice in (None, "auto"):
        raise ServingError(
            "tool_choice 'auto' (the default with tools) needs a chat template that renders "
            "tools and a parser of the model's tool-call format; this server has neither for "
            "its model: use tool_choice 'required' or name a function",
            400,
        )
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        raise ServingError("two tools have the same name", 400)
    if response_format is not None and response_format.type != "text":
        raise ServingError("a forced tool call cannot also have a response_format", 400)
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in names:
            raise ServingError(
                f"tool_choice names the function '{name}', which is not among the tools "
                f"({', '.join(names)})",
                400,
            )
        chosen = [tools[names.index(name)]]
    else:  # "required"
        chosen = tools
    if len(chosen) == 1:
        function = chosen[0].function
        return ToolPlan(_grammar(function.name, function.parameters or NO_ARGUMENTS), function.name)
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.function.name},
                    "arguments": tool.function.parameters or NO_ARGUMENTS,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in chosen
        ]
    }
    return ToolPlan(_grammar(", ".join(names), schema), None)


def _grammar(what: str, schema: dict[str, Any]) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as exc:
        raise ServingError(f"tool '{what}' parameters: {exc}", 400) from None


def call_text(name: str, arguments: str) -> str:
    """An earlier call as GLM-4 writes it in an assistant turn."""
    return f"{name}\n{arguments}"


class ToolCallStream:
    """A forced call's text as it streams -> the function's name once known, then the
    arguments' text in pieces (OpenAI's tool_call deltas)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.name: str | None = None  # announced
        self._text = ""  # all the text so far
        self._sent = 0  # characters of the arguments already given out

    def push(self, text: str) -> tuple[str | None, str]:
        """(the name if it is known only now, else None; more of the arguments' text)."""
        self._text += text
        start, end = self._arguments_span()
        if start is None:
            return None, ""
        announced = None
        if self.name is None:
            self.name = announced = self.plan.name or _CALL_PREFIX.match(self._text).group(1)  # type: ignore[union-attr]
        piece = self._text[start + self._sent : end]
        self._sent += len(piece)
        return announced, piece

    def _arguments_span(self) -> tuple[int | None, int]:
        """Where the arguments are in the text so far: all of it for a named function; after
        the name for a call among several, holding back the last character (the call's
        closing brace, once the text is complete)."""
        if self.plan.name is not None:
            return 0, len(self._text)
        match = _CALL_PREFIX.match(self._text)
        if match is None:
            return None, 0
        return match.end(), len(self._text) - 1

    @property
    def complete(self) -> bool:
        """The text so far is a whole call."""
        return self.plan.parse(self._text) is not None

    def finish(self) -> str:
        """The arguments' text still held when the generation ends (a whole call's closing
        brace is not part of them)."""
        start, _ = self._arguments_span()
        if start is None or self.plan.name is not None or self.complete:
            return ""
        piece = self._text[start + self._sent :]
        self._sent += len(piece)
        return piece


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
