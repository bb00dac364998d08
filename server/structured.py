"""Structured outputs and tool calls (OpenAI's `response_format`, `tools` + `tool_choice`).

`response_format` json_object / json_schema becomes a grammar that the engine enforces while it
decodes (model/grammar.py). A forced call (`tool_choice` "required", or a named function) is
generated under a grammar too: a named function's arguments under its parameters schema; with
"required" among several tools, `{"name":...,"arguments":...}` under the union of their
schemas (the name first, so that a stream can announce it before the arguments). With
`tool_choice` "auto" the tools go to a chat template that renders them (the engine refuses the
request when the model's does not) and the reply is read in GLM-4's call format. Earlier calls
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
    """How a reply with tools is read. A forced call: the grammar of the generated text and,
    with one function, its name (None: the text names the function,
    `{"name":...,"arguments":...}`). "auto" (grammar None): the model answers in text or calls
    a function in GLM-4's format, `name\\n{arguments}`, `names` being the functions it may call."""

    grammar: str | None
    name: str | None
    names: tuple[str, ...] = ()

    @property
    def auto(self) -> bool:
        return self.grammar is None

    def parse(self, text: str) -> tuple[str, str] | None:
        """(function name, arguments as JSON text) of a complete generation; None when the text
        is not a whole call (the generation ran out of tokens, or "auto" answered in text)."""
        if self.auto:
            name, newline, arguments = text.partition("\n")
            if not newline or name.strip() not in self.names:
                return None
            return (name.strip(), arguments.strip()) if _is_object(arguments) else None
        if not _is_object(text):
            return None
        if self.name is not None:
            return self.name, text
        value = json.loads(text)
        return value["name"], json.dumps(value["arguments"], separators=(",", ":"))


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


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
    names = [tool.function.name for tool in tools]
    if len(set(names)) < len(names):
        raise ServingError("two tools have the same name", 400)
    if response_format is not None and response_format.type != "text":
        raise ServingError("tools (other than tool_choice 'none') exclude response_format", 400)
    if tool_choice in (None, "auto"):  # the engine refuses it unless the template renders tools
        return ToolPlan(None, None, tuple(names))
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
    """A reply's text as it streams -> its text deltas, or (a call) the function's name once
    known, then the arguments' text in pieces (OpenAI's tool_call deltas)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.name: str | None = None  # announced
        self.text_mode = False  # "auto" answered in text
        self._text = ""  # all the text so far
        self._sent = 0  # characters of the arguments (or of the text) already given out

    def push(self, text: str) -> tuple[str, str | None, str]:
        """(more of the answer's text; the name if it is known only now, else None; more of
        the arguments' text)."""
        self._text += text
        if self.plan.auto and self.name is None:
            self._decide()
        if self.text_mode:
            piece = self._text[self._sent :]
            self._sent = len(self._text)
            return piece, None, ""
        start, end = self._arguments_span()
        if start is None:
            return "", None, ""
        announced = None
        if self.name is None:
            self.name = announced = self._name()
        piece = self._text[start + self._sent : end]
        self._sent += len(piece)
        return "", announced, piece

    def _decide(self) -> None:
        """ "auto": a call once the first line is a function's name; text as soon as it cannot
        be one."""
        first, newline, _ = self._text.partition("\n")
        if newline:
            self.text_mode = first.strip() not in self.plan.names
        elif not any(name.startswith(first.strip()) for name in self.plan.names):
            self.text_mode = True

    def _name(self) -> str:
        if self.plan.auto:
            return self._text.partition("\n")[0].strip()
        if self.plan.name is not None:
            return self.plan.name
        return _CALL_PREFIX.match(self._text).group(1)  # type: ignore[union-attr]

    def _arguments_span(self) -> tuple[int | None, int]:
        """Where the arguments are in the text so far: all of it for a named function, after
        the name's line for "auto"; after the name for a call among several, holding back the
        last character (the call's closing brace, once the text is complete)."""
        if self.plan.auto:
            first, newline, _ = self._text.partition("\n")
            return (len(first) + 1, len(self._text)) if newline else (None, 0)
        if self.plan.name is not None:
            return 0, len(self._text)
        match = _CALL_PREFIX.match(self._text)
        if match is None:
            return None, 0
        return match.end(), len(self._text) - 1

    @property
    def complete(self) -> bool:
        """The text so far is a whole call."""
        return not self.text_mode and self.plan.parse(self._text) is not None

    def finish(self) -> tuple[str, str]:
        """At the end: (the text still held, as text; the arguments' text still held). An
        "auto" reply that never became a call is text; a whole call's closing brace is not
        part of its arguments."""
        if self.plan.auto and self.name is None:
            piece = self._text[self._sent :]
            self._sent = len(self._text)
            return piece, ""
        start, _ = self._arguments_span()
        if start is None or self.plan.name is not None or self.plan.auto or self.complete:
            return "", ""
        piece = self._text[start + self._sent :]
        self._sent += len(piece)
        return "", piece


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
