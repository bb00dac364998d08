"""`xllm chat`: as a subprocess against the real server, and in-process through `xllm.main.main`
(the error path of `main` imports torch, seconds per process, so most error cases run in-process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import httpx
import pytest

import xllm.main
from xllm.clients import chat_cli
from xllm.clients.client import XLLMClient

# Runs `xllm.main.main` as the `xllm` command does, leaving out subcommand modules that do not
# exist yet (other packages' commands may still be in the works); a no-op once they all exist.
XLLM = """
import importlib.util, sys
import xllm.main as m
m.COMMAND_MODULES = tuple(n for n in m.COMMAND_MODULES if importlib.util.find_spec(n) is not None)
sys.exit(m.main(sys.argv[1:]))
"""


def xllm_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", XLLM, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.fixture
def xllm_main(monkeypatch, capsys):
    """Run `xllm ARGS...` in this process: (exit code, stdout, stderr)."""
    present = tuple(n for n in xllm.main.COMMAND_MODULES if importlib.util.find_spec(n))
    monkeypatch.setattr(xllm.main, "COMMAND_MODULES", present)

    def run(*args: str) -> tuple[int, str, str]:
        code = xllm.main.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_line_error(code: int, stderr: str, *expected: str) -> None:
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xllm chat: error: "), stderr
    for text in expected:
        assert text in lines[0]


# --- the real command, in a subprocess ---
def test_chat_streams_the_answer(server_url: str, tmp_path, png_bytes: bytes) -> None:
    image = tmp_path / "shape.png"
    image.write_bytes(png_bytes)
    args = ("--url", server_url, "--max-tokens", "6", "--temperature", "0", "--seed", "1")
    result = xllm_subprocess(
        "chat", *args, "--image", str(image), "--system", "Be brief.", "<image> What?"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert result.stderr == ""


def test_missing_file(server_url: str, tmp_path) -> None:
    missing = tmp_path / "nope.wav"
    result = xllm_subprocess("chat", "--url", server_url, "--audio", str(missing), "Said?")
    assert_one_line_error(result.returncode, result.stderr, str(missing), "No such file")
    assert result.stdout == ""


# --- in-process ---
def test_server_error_answer(server_url: str, xllm_main) -> None:
    code, out, err = xllm_main("chat", "--url", server_url, "--temperature", "-1", "hi")
    assert_one_line_error(code, err, "422", "temperature")
    assert out == ""


def test_server_unreachable(dead_url: str, xllm_main) -> None:
    code, _, err = xllm_main("chat", "--url", dead_url, "hi")
    assert_one_line_error(code, err, dead_url)


def canned_stream(monkeypatch, *events: object) -> list[httpx.Request]:
    """Make XLLMClient answer every request with these SSE events; returns the requests seen."""
    seen: list[httpx.Request] = []
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    transport = httpx.MockTransport(handler)

    def http_client(**options: object) -> httpx.Client:
        return httpx.Client(**{**options, "transport": transport})  # type: ignore[arg-type]

    monkeypatch.setattr(XLLMClient, "_HTTP", staticmethod(http_client))
    return seen


def test_api_key_from_env_and_streamed_output(monkeypatch, xllm_main) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    seen = canned_stream(
        monkeypatch,
        {"id": "r", "delta": "Hel"},
        {"id": "r", "delta": "lo", "finish_reason": "stop", "usage": usage},
        "[DONE]",
    )
    monkeypatch.setenv("XLLM_API_KEY", "from-env")
    assert xllm_main("chat", "--url", "http://x", "hi") == (0, "Hello\n", "")
    assert seen[-1].headers["authorization"] == "Bearer from-env"
    assert xllm_main("chat", "--url", "http://x", "--api-key", "flag", "hi")[0] == 0
    assert seen[-1].headers["authorization"] == "Bearer flag"


def test_error_in_the_middle_of_the_answer(monkeypatch, xllm_main) -> None:
    error = {"error": {"message": "the model worker died", "type": "server_error", "code": 500}}
    canned_stream(monkeypatch, {"id": "r", "delta": "Hel"}, error, "[DONE]")
    code, out, err = xllm_main("chat", "--url", "http://x", "hi")
    assert out == "Hel\n"  # the partial answer ends its line before the error
    assert_one_line_error(code, err, "500", "worker died")


def test_parser_and_light_imports() -> None:
    parser = argparse.ArgumentParser(prog="xllm")
    chat_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "--image", "a.png", "--image", "b.png", "--seed", "3", "q?"])
    assert [str(p) for p in args.images] == ["a.png", "b.png"] and args.audios == []
    assert (args.question, args.seed, args.url) == ("q?", 3, "http://127.0.0.1:8000")
    assert args.func is chat_cli.run_chat
    # `xllm --help` imports every command module: this one must not pull in httpx or torch.
    probe = (
        "import sys, xllm.clients.chat_cli; print(sorted({'httpx', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30
    )
    assert result.stdout.strip() == "[]", result


def test_chat_answers_in_json_under_a_schema(server_url: str, tmp_path, xllm_main) -> None:
    schema = tmp_path / "shape.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"shape": {"enum": ["circle", "star"]}},
                "required": ["shape"],
                "additionalProperties": False,
            }
        )
    )
    code, out, err = xllm_main(
        "chat",
        "--url",
        server_url,
        "--response-format",
        str(schema),
        "--max-tokens",
        "32",
        "Shape?",
    )
    assert code == 0, err
    assert json.loads(out)["shape"] in ("circle", "star")
    code, _, err = xllm_main("chat", "--url", server_url, "--response-format", "nope.json", "hi")
    assert_one_line_error(code, err, "--response-format", "nope.json")
