"""The libraries product backends talk to model servers through, unchanged, against a real
`xllm serve` on the tiny random model: LangChain's `ChatOpenAI(...).with_structured_output(
Model, method="json_schema")` and LiteLLM's `completion(model="openai/...", api_base=...)`."""

from __future__ import annotations

import langchain_openai
import litellm
from pydantic import BaseModel, Field


class Pet(BaseModel):
    name: str = Field(max_length=8)
    kind: str = Field(pattern="^(cat|dog)$")
    age: int = Field(ge=0, le=30)


def test_langchain_structured_output_json_schema(server):
    parsed = []
    for seed in range(6):
        llm = langchain_openai.ChatOpenAI(
            base_url=f"{server.url}/v1",
            api_key="unused",
            model="m",
            temperature=1.0,
            max_tokens=120,
            seed=seed,
            max_retries=0,
        )
        structured = llm.with_structured_output(Pet, method="json_schema", include_raw=True)
        out = structured.invoke("Describe a pet.")
        finish = out["raw"].response_metadata["finish_reason"]
        if finish == "length":  # a random model may ramble inside a string
            continue
        assert finish == "stop" and out["parsing_error"] is None
        assert isinstance(out["parsed"], Pet)
        parsed.append(out["parsed"])
    assert parsed, "some answers finish within 120 tokens"
    assert all(p.kind in ("cat", "dog") and 0 <= p.age <= 30 for p in parsed)


def test_litellm_completion(server):
    reply = litellm.completion(
        model="openai/m",
        api_base=f"{server.url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=1,
    )
    assert len(reply.choices) == 2
    assert all(isinstance(c.message.content, str) for c in reply.choices)
    assert reply.usage.completion_tokens <= 12
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    structured = litellm.completion(
        model="openai/m",
        api_base=f"{server.url}/v1",
        api_key="unused",
        messages=[{"role": "user", "content": "ok?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        max_tokens=20,
    )
    assert structured.choices[0].message.content in ('{"ok":true}', '{"ok":false}')
