"""Tool calls through the official `openai` client against a real `xllm serve` on the tiny
random model: a forced call's arguments validate against the function's parameters (named, or
"required" among several), streamed as OpenAI's tool_call deltas, tool results and earlier
calls accepted in the history, the 400s of what cannot be honoured, and tool_choice "auto" on a
model whose chat template renders tools (GLM-4's call format read as a call)."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

from xllm.server.structured import ToolCallStream, ToolPlan

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "what is the weather in Paris?"}]
SAMPLED = {"temperature": 1.0, "max_tokens": 120, "extra_body": {"top_k": 0}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def check_call(choice, names=("get_weather", "get_time")) -> str:
    """The choice is one whole call whose arguments validate; its function's name."""
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return call.function.name


def test_named_function_arguments_validate(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = 0
    for seed in range(8):
        reply = client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, tool_choice=named, seed=seed, **SAMPLED
        )
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue
        assert check_call(choice) == "get_weather"
        whole += 1
    assert whole >= 4


def test_required_picks_among_the_tools(client):
    names = set()
    for seed in range(10):
        reply = client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required", seed=seed, **SAMPLED
        )
        if reply.choices[0].finish_reason != "length":
            names.add(check_call(reply.choices[0]))
    assert names, "some calls finish"


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_streamed_call_equals_the_whole_reply(client, tool_choice):
    kwargs = {"model": "m", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice}
    whole = client.chat.completions.create(seed=4, **kwargs, **SAMPLED).choices[0]
    name, arguments, ids, finish = None, "", set(), None
    for chunk in client.chat.completions.create(stream=True, seed=4, **kwargs, **SAMPLED):
        for choice in chunk.choices:
            assert choice.delta.content in (None, "")
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                if delta.id is not None:
                    ids.add(delta.id)
                    name = delta.function.name
                arguments += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and finish == whole.finish_reason
    if whole.finish_reason == "tool_calls":
        (call,) = whole.message.tool_calls
        assert (name, arguments) == (call.function.name, call.function.arguments)


def test_history_with_calls_and_results(client):
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city":"Paris","unit":"celsius","days":1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=8)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    # the history costs prompt tokens: the call and the result are in the prompt
    short = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8)
    assert reply.usage.prompt_tokens > short.usage.prompt_tokens + 10


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert reply.choices[0].message.tool_calls is None


def test_what_cannot_be_honoured_is_400(client):
    ask = client.chat.completions.create
    with pytest.raises(openai.BadRequestError, match="'nope'"):
        ask(
            model="m",
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError, match="auto"):
        ask(model="m", messages=MESSAGES, tools=TOOLS)
    with pytest.raises(openai.BadRequestError, match="auto"):
        ask(model="m", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    with pytest.raises(openai.BadRequestError, match="needs 'tools'"):
        ask(model="m", messages=MESSAGES, tool_choice="required")
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]
    with pytest.raises(openai.BadRequestError, match="tool 'f'"):
        ask(model="m", messages=MESSAGES, tools=bad, tool_choice="required")


# A GLM-4-style template that lays out the tools in a system turn (GLM-4's own does so).
TOOLS_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# Tools{% for tool in tools %}\n## "
    "{{ tool['function']['name'] }}\n{{ tool['function'] | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tools_client(start_server, tiny_model_dir, tmp_path_factory) -> openai.OpenAI:
    """A server whose model's chat template renders tools."""
    model_dir = tmp_path_factory.mktemp("tools-model") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "llm" / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    server = start_server(model_dir=model_dir)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_auto_where_the_template_renders_tools(tools_client):
    plain = tools_client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4)
    for tool_choice in ("auto", None):
        extra = {"tool_choice": tool_choice} if tool_choice else {}
        reply = tools_client.chat.completions.create(
            model="m", messages=MESSAGES, tools=TOOLS, max_tokens=4, **extra
        )
        # the tools are in the prompt; the random model answers in text, which stays text
        assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 20
        choice = reply.choices[0]
        assert choice.message.tool_calls is None and choice.message.content is not None
    # forced calls on this model see the tools too
    forced = tools_client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=4
    )
    assert forced.usage.prompt_tokens == reply.usage.prompt_tokens


def test_glm4_call_format_is_read_as_a_call():
    plan = ToolPlan(None, None, ("get_weather", "get_time"))
    assert plan.parse('get_weather\n{"city": "Paris"}') == ("get_weather", '{"city": "Paris"}')
    assert plan.parse("get_weather is a tool") is None
    assert plan.parse('nope\n{"a": 1}') is None
    stream = ToolCallStream(plan)
    pieces = [stream.push(p) for p in ("get_w", "eather\n", '{"city"', ': "Paris"}')]
    assert pieces == [
        ("", None, ""),
        ("", "get_weather", ""),
        ("", None, '{"city"'),
        ("", None, ': "Paris"}'),
    ]
    assert stream.complete and stream.finish() == ("", "")
    text = ToolCallStream(plan)
    assert text.push("get") == ("", None, "")  # could still be a name
    assert text.push(" it?") == ("get it?", None, "")  # cannot: text from here on
    assert not text.complete and text.finish() == ("", "")
    held = ToolCallStream(plan)
    assert held.push("get_ti") == ("", None, "")
    assert held.finish() == ("get_ti", "")  # ended before a name was whole: text
