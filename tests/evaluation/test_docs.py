"""docs/EVALUATION.md stays true: its commands parse, its tables match the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from xllm.model.evaluation.published import PUBLISHED
from xllm.model.evaluation.tasks import TASKS

DOC = Path(__file__).resolve().parents[2] / "docs" / "EVALUATION.md"


def commands() -> list[list[str]]:
    text = DOC.read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line.startswith("xllm ")]


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a[:3]))
def test_commands_parse(argv: list[str]) -> None:
    from xllm.main import build_parser

    argv = [a for a in argv if a != "&"]
    args = build_parser().parse_args(argv[1:])
    assert callable(args.func)


def test_tables_match_the_code() -> None:
    text = DOC.read_text()
    for task in TASKS:
        assert f"| `{task}` |" in text, task
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for fig in PUBLISHED:
        value = ("≈ " if fig.approx else "") + fig.value
        assert any(fig.system in r and f"| {value} |" in r for r in rows), (fig.system, value)
