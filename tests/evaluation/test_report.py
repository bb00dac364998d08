"""Report files and their Markdown, from a hand-made report."""

from __future__ import annotations

import json
from pathlib import Path

from xllm.model.evaluation.published import figures_for
from xllm.model.evaluation.report import to_markdown, write_report


def asr_result(**extra) -> dict:
    return {
        "task": "asr",
        "url": "http://server:8000",
        "mode": "openai-api",
        "data": "/data/test-clean.jsonl",
        "rows": 2,
        "skipped": 1,
        "failed": {"count": 1, "ids": ["u3"], "first_error": "HTTP 413: too large"},
        "wer": 0.0425,
        "cer": 0.0123,
        "normalizer": "english",
        **extra,
    }


def test_markdown_and_files(tmp_path: Path) -> None:
    report = {
        **asr_result(),
        "created": "now",
        "published": [f.as_dict() for f in figures_for(["asr"])],
    }
    markdown = to_markdown(report)
    assert "# xllm eval: http://server:8000" in markdown
    assert (
        "| asr | test-clean.jsonl | 2 | 1 | 1 | WER 4.25% · CER 1.23% (english normaliser) |"
        in (markdown)
    )
    assert "asr: 1 row(s) left out, not answered: u3 (first error: HTTP 413: too large)" in markdown
    assert "| LibriSpeech test-clean / test-other | SLAM-ASR | WER % | 1.84 / 3.39 |" in markdown
    assert "LLaVA-Bench" not in markdown  # only the figures of the tasks run
    paths = write_report(report, [{"task": "asr", "id": "u1"}], tmp_path / "out" / "r.json")
    assert json.loads(paths["json"].read_text()) == report
    assert paths["markdown"].name == "r.md" and paths["markdown"].read_text() == markdown
    assert paths["predictions"].read_text() == '{"task": "asr", "id": "u1"}\n'


def test_several_tasks_and_left_out(tmp_path: Path) -> None:
    report = {
        "tasks": {"asr": asr_result()},
        "left_out": {"relative-score": "no judge (--judge-url)"},
        "published": [],
    }
    markdown = to_markdown(report)
    assert "| relative-score | - | - | - | - | not run: no judge (--judge-url) |" in markdown
    assert "Published figures" not in markdown
