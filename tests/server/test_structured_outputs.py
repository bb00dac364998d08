"""Structured outputs through the official `openai` client against a real `xllm serve` on the
tiny random model: `response_format` json_object and json_schema enforced by grammar-constrained
decoding (outputs parse and validate over many seeds at temperature 1, streamed too), the
clear 400s of schemas that cannot be enforced, and finish_reason "length" for a grammar that
cannot finish within max_tokens."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "pet": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                    "required": ["kind", "lives"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "required": ["name", "age", "colour", "tags", "pet"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON, "strict": True},
}
MESSAGES = [{"role": "user", "content": "describe a person as JSON"}]
NO_EOS = {"top_k": 0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_outputs_validate_over_many_seeds(client):
    finished = 0
    for seed in range(12):
        reply = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            response_format=SCHEMA_FORMAT,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            n=2,
            extra_body=NO_EOS,
        )
        for choice in reply.choices:
            if choice.finish_reason == "length":  # a random model may ramble inside a string
                continue
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), PERSON)
            finished += 1
    assert finished >= 12, "most answers finish within 200 tokens"


def test_json_object_is_an_object(client):
    for seed in range(6):
        reply = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=64,
            extra_body=NO_EOS,
        )
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut short, but what came out is the start of an object
            assert choice.message.content.startswith("{")


def test_streamed_json_equals_the_whole_reply(client):
    kwargs = {
        "model": "m",
        "messages": MESSAGES,
        "response_format": SCHEMA_FORMAT,
        "temperature": 1.0,
        "seed": 3,
        "max_tokens": 200,
        "extra_body": NO_EOS,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (text, finish) == (whole.message.content, whole.finish_reason)


def test_greedy_structured_output_validates(client):
    reply = client.chat.completions.create(
        model="m", messages=MESSAGES, response_format=SCHEMA_FORMAT, temperature=0, max_tokens=200
    )
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_a_grammar_that_cannot_finish_ends_with_length(client):
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string"}, "minItems": 50}},
        "required": ["words"],
    }
    reply = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        max_tokens=8,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.startswith('{"words":[')
    assert reply.usage.completion_tokens == 8


def test_schemas_that_cannot_be_enforced_are_400(client):
    def ask(schema):
        return client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )

    with pytest.raises(openai.BadRequestError, match="not"):
        ask({"type": "object", "properties": {"a": {"not": {"type": "string"}}}})
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        ask({"type": "array", "uniqueItems": True})
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(openai.BadRequestError, match="levels deep"):
        ask(deep)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}
    with pytest.raises(openai.BadRequestError, match="characters"):
        ask(big)
    with pytest.raises(openai.BadRequestError, match=r"json_schema\.schema"):
        client.chat.completions.create(
            model="m", messages=MESSAGES, response_format={"type": "json_schema"}
        )
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            response_format={"type": "json_object"},
            extra_body={"min_tokens": 3},
        )


def test_unconstrained_rows_beside_constrained_ones_are_unchanged(client):
    """Greedy text without a grammar is the same alone and in a batch with constrained rows."""
    plain = {
        "model": "m",
        "messages": [{"role": "user", "content": "an unconstrained story"}],
        "temperature": 0,
        "max_tokens": 24,
        "extra_body": {"ignore_eos": True},
    }
    alone = client.chat.completions.create(**plain).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        constrained = [
            pool.submit(
                client.chat.completions.create,
                model="m",
                messages=MESSAGES,
                response_format=SCHEMA_FORMAT,
                temperature=1.0,
                seed=seed,
                max_tokens=48,
            )
            for seed in range(3)
        ]
        beside = pool.submit(client.chat.completions.create, **plain)
        assert beside.result().choices[0].message.content == alone
        for future in constrained:
            choice = future.result().choices[0]
            if choice.finish_reason == "stop":
                jsonschema.validate(json.loads(choice.message.content), PERSON)
