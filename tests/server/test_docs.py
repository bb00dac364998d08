"""The README's curl examples run against a real server; openapi.yaml matches the app."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_curl_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]


def test_readme_curl_examples_run(server):
    commands = readme_curl_commands()
    assert len(commands) >= 5
    host = server.url.removeprefix("http://")
    file_id = "$FILE_ID"  # the media handle the README's upload line makes, once it has run
    for command in commands:
        args = [
            arg.replace("localhost:8000", host).replace("$FILE_ID", file_id)
            for arg in shlex.split(command)
        ]
        out = subprocess.run(
            [*args, "-sS", "-w", "\n%{http_code}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        body, _, status = out.stdout.rpartition("\n")
        assert out.returncode == 0 and status == "200", f"{command}\n{out.stdout}\n{out.stderr}"
        if "stream=true" in command:
            assert body.rstrip().endswith("data: [DONE]")
        elif "/v1/files" in command:  # a file object (the upload's id serves the next lines)
            reply = json.loads(body)
            assert reply["object"] in ("file", "list")
            if "-X DELETE" in command:
                assert reply == {"id": file_id, "object": "file", "deleted": True}
            elif "file=@" in command:
                file_id = reply["id"]
        else:
            reply = json.loads(body)
            choice = reply["choices"][0] if "choices" in reply else {}
            text = reply.get("text", choice.get("text"))  # /chat, /v1/completions
            assert text is not None or choice["message"]["content"] is not None
            if '"json_schema"' in command:  # structured output: the schema's JSON
                answer = json.loads(choice["message"]["content"])
                assert set(answer) == {"shape", "color"}


def test_openapi_yaml_is_generated_from_the_app():
    from xllm.server.openapi import openapi_yaml

    assert (ROOT / "openapi.yaml").read_text() == openapi_yaml(), (
        "openapi.yaml is stale: run `python -m xllm.server.openapi openapi.yaml`"
    )


def test_ci_runs_the_readmes_test_command_as_written():
    """CI tests the stack a user gets: the README's Quick start test command, nothing pinned."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") :]
    command = re.search(r"Test:\n\n```sh\n(.*?)\n```", quick_start, flags=re.S)
    assert command, "the README's Quick start has no Test command"
    steps = command.group(1).split(" && ")
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    at = [ci.index(step) for step in steps]  # each step is a line of CI's script ...
    assert at == sorted(at), "... in the README's order"
    # ... and nothing else in CI installs Python packages or changes pip.
    installs = [line for line in ci if re.search(r"\bpip(3)?\b|\buv\b|python3? -m pip", line)]
    assert installs == [step for step in steps if "pip" in step], installs
