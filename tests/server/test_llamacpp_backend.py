"""`xllm serve --llm-backend llamacpp`: the frozen LLM on llama.cpp behind the same HTTP API.

Two real servers on the tiny Llama model, one per backend, both float32: the same greedy answers
to a typed question, a question about an image (prompt embeddings into llama.cpp) and a
streamed OpenAI chat, and the flags a user can get wrong refused before anything loads.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.servers import ServerProcess


@pytest.fixture(scope="module")
def servers(start_server, tiny_llama_model_dir) -> dict[str, ServerProcess]:
    flags = ("--dtype", "float32", "--device", "cpu")
    return {
        backend: start_server(*flags, "--llm-backend", backend, model_dir=tiny_llama_model_dir)
        for backend in ("torch", "llamacpp")
    }


def answer(server: ServerProcess, **files) -> dict:
    data = {"prompt": "What is in the picture?", "max_tokens": "12", "ignore_eos": "true"}
    response = httpx.post(f"{server.url}/chat", data=data, files=files, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_llamacpp_answers_as_torch_does_with_and_without_media(servers, media_bytes) -> None:
    assert "llama.cpp backend ready" in servers["llamacpp"].log_text()
    assert "llama.cpp backend ready" not in servers["torch"].log_text()
    for files in ({}, {"image": ("a.png", media_bytes["png"], "image/png")}):
        got, expected = answer(servers["llamacpp"], **files), answer(servers["torch"], **files)
        assert got["text"] == expected["text"] and got["usage"] == expected["usage"]
        assert got["usage"]["completion_tokens"] == 12
    assert got["usage"]["prompt_tokens_details"]["image_tokens"] > 0


def test_llamacpp_streams_openai_chat_with_logprobs(servers) -> None:
    body = {
        "model": "x",
        "messages": [{"role": "user", "content": "Count to three."}],
        "max_tokens": 8,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 2,
    }

    def stream(server: ServerProcess) -> list[str]:
        tokens = []
        url = f"{server.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    for entry in (choice.get("logprobs") or {}).get("content") or []:
                        tokens.append(entry["token"])
        return tokens

    got = stream(servers["llamacpp"])
    assert got and got == stream(servers["torch"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "nf4"], "none or int8"),
        (["--device", "cuda"], "runs on the CPU"),
    ],
)
def test_backend_flags_a_user_gets_wrong_exit_2(flags, message, tiny_llama_model_dir) -> None:
    command = [sys.executable, "-m", "xllm", "serve", "--model", str(tiny_llama_model_dir)]
    result = subprocess.run(
        [*command, "--llm-backend", "llamacpp", *flags], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_llamacpp_keeps_structured_outputs(servers) -> None:
    schema = {
        "type": "object",
        "properties": {"shape": {"enum": ["circle", "square"]}},
        "required": ["shape"],
        "additionalProperties": False,
    }
    body = {
        "model": "x",
        "messages": [{"role": "user", "content": "Describe the picture as JSON."}],
        "max_tokens": 40,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }

    def content(server: ServerProcess) -> str:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    got = content(servers["llamacpp"])
    assert got == content(servers["torch"])
    assert json.loads(got)["shape"] in ("circle", "square")  # the grammar held on llama.cpp
