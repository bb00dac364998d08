"""Every task from one command on the offline pack: in-process, then against a real server.

The tiny model's answers are noise; what is checked is the plumbing (every task runs, every row
is answered and scored, both paths give the same answers), the judge protocol (prompt format,
retry on 429, unparseable reviews reported, the cache making a second run call nothing) and the
report files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.evaluation.conftest import PACK_N
from tests.evaluation.judge_standin import JudgeStandIn
from xllm.model.evaluation.judge import SYSTEM_PROMPT

FLAGS = ["--max-tokens", "4", "--no-progress", "--judge-model", "stand-in"]
KEY_ENV = "XLLM_TEST_JUDGE_KEY"
UNPARSEABLE_ID = "relative-score-00001"  # the pack's second question is a "detail" one


def review(content: str) -> str:
    """8 for the reference, 6 for the candidate; no scores at all for 'in detail' questions."""
    question = content.split("[Question]\n", 1)[1].split("\n\n", 1)[0]
    if "in detail" in question:
        return "Assistant 1 is better.\nIt describes the image."
    return "8 6\nAssistant 1 is accurate; Assistant 2 is not."


def run_cli(argv: list, capsys) -> tuple[int, dict[str, Any], str]:
    """`xllm ARGV` in this process -> (exit code, the JSON report on stdout, stderr)."""
    from xllm.main import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def run_quietly(argv: list) -> tuple[int, dict[str, Any]]:
    """The same for module fixtures (capsys is per test): stdout captured by hand."""
    import contextlib
    import io

    from xllm.main import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(a) for a in argv])
    return code, json.loads(stdout.getvalue()) if stdout.getvalue().strip() else {}


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("judge-cache")


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, eval_pack, judge_cache, tmp_path_factory, eval_server_started):
    """`xllm eval --task all` in-process with the stand-in judge (its first call answers 429),
    then relative-score alone again: the second run must be served from the cache.
    (`eval_server_started` only boots the server meanwhile, for the --url test.)"""
    out = tmp_path_factory.mktemp("local") / "report.json"
    base = ["eval", "--data", eval_pack, "--model", tiny_model_dir, "--device", "cpu", *FLAGS]
    base += ["--judge-cache", judge_cache, "--judge-key-env", KEY_ENV]
    with pytest.MonkeyPatch.context() as mp, JudgeStandIn(review, busy=1) as judge:
        mp.setenv(KEY_ENV, "sk-test")
        code, report = run_quietly([*base, "--task", "all", "--judge-url", judge.url, "--out", out])
        first = {"code": code, "report": report, "calls": judge.calls}
        first["bodies"], first["headers"] = list(judge.bodies), list(judge.headers)
        judge.reset()
        again = out.with_name("again.json")
        argv = [*base, "--task", "relative-score", "--judge-url", judge.url, "--out", again]
        code, report = run_quietly(argv)
        second = {"code": code, "report": report, "calls": judge.calls}
    return {"out": out, "first": first, "second": second}


def test_every_task_runs_in_process(local_run, eval_pack) -> None:
    first = local_run["first"]
    assert first["code"] == 0
    report = first["report"]
    tasks = report["tasks"]
    assert list(tasks) == ["asr", "masr", "vqa", "caption", "direction", "relative-score"]
    assert report["left_out"] == {}
    for name, result in tasks.items():
        assert result["mode"] == "in-process" and result["skipped"] == 0, name
        assert result["rows"] + result["failed"]["count"] == PACK_N, name
    for name in ("asr", "masr", "vqa", "caption", "direction"):
        assert tasks[name]["rows"] == PACK_N and tasks[name]["failed"]["count"] == 0
    assert tasks["asr"]["wer"] >= 0 and tasks["asr"]["normalizer"] == "english"
    masr = tasks["masr"]
    assert masr["wer_delta"] == pytest.approx(masr["wer"] - masr["wer_without_image"])
    assert masr["cer_delta"] == pytest.approx(masr["cer"] - masr["cer_without_image"])
    for name in ("vqa", "caption", "direction"):
        assert 0 <= tasks[name]["keyword_accuracy"] <= 1
    # the report files: JSON (== stdout), Markdown, predictions
    out = local_run["out"]
    assert json.loads(out.read_text()) == report
    markdown = out.with_suffix(".md").read_text()
    assert "| relative-score |" in markdown and "relative-score by category" in markdown
    assert "Published figures" in markdown and "84.5" in markdown and "1.84 / 3.39" in markdown
    predictions = [json.loads(line) for line in out.with_suffix(".predictions.jsonl").open()]
    assert len(predictions) == 6 * PACK_N
    masr_rows = [p for p in predictions if p["task"] == "masr"]
    assert all(set(p["answers"]) == {"with_image", "without_image"} for p in masr_rows)


def test_relative_score_protocol(local_run) -> None:
    first = local_run["first"]
    result = first["report"]["tasks"]["relative-score"]
    # one 429 (retried) + one call per question
    assert first["calls"] == PACK_N + 1
    assert result["judge"]["calls"] == PACK_N + 1 and result["judge"]["cache_hits"] == 0
    # the unparseable review is reported and left out, not scored
    assert result["unparseable"] == {
        "count": 1,
        "ids": [UNPARSEABLE_ID],
        "reasons": [
            {"id": UNPARSEABLE_ID, "reason": result["unparseable"]["reasons"][0]["reason"]}
        ],
    }
    assert result["failed"]["ids"] == [UNPARSEABLE_ID]
    assert result["rows"] == result["reviewed"] == PACK_N - 1
    # 8 vs 6 everywhere: 75 % per category and overall
    assert result["relative_score"] == pytest.approx(75.0)
    assert result["categories"]["conversation"] == {
        "n": 1,
        "reference_mean": 8.0,
        "candidate_mean": 6.0,
        "relative_score": pytest.approx(75.0),
    }
    assert set(result["categories"]) == {"conversation", "complex", "all"}
    # the requests: LLaVA's system prompt, the sections in order, the key from the named env var
    body = first["bodies"][-1]
    assert body["model"] == "stand-in" and body["temperature"] == 0.2
    assert body["max_tokens"] == 1024
    assert body["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    content = body["messages"][1]["content"]
    sections = [
        "[Context]\n",
        "[Question]\n",
        "[Assistant 1]\n",
        "[End of Assistant 1]",
        "[Assistant 2]\n",
        "[End of Assistant 2]",
        "[System]\n",
    ]
    positions = [content.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "two values indicating the scores for Assistant 1 and 2" in content
    assert all(h.get("Authorization") == "Bearer sk-test" for h in first["headers"])


def test_second_run_makes_no_judge_calls(local_run) -> None:
    second = local_run["second"]
    assert second["code"] == 0
    assert second["calls"] == 0  # counted by the stand-in
    result = second["report"]
    assert result["task"] == "relative-score"  # one task: a flat report
    assert result["judge"]["calls"] == 0 and result["judge"]["cache_hits"] == PACK_N
    first = local_run["first"]["report"]["tasks"]["relative-score"]
    assert result["categories"] == first["categories"]
    assert result["unparseable"]["ids"] == [UNPARSEABLE_ID]


def test_every_task_against_a_server(
    eval_server, eval_pack, local_run, judge_cache, tmp_path, capsys
) -> None:
    """The same command with --url: the server's greedy answers equal the in-process ones, so
    every review comes from the cache made by the in-process run."""
    out = tmp_path / "server.json"
    with JudgeStandIn(review) as judge:
        code, report, _ = run_cli(
            [
                "eval",
                "--task",
                "all",
                "--data",
                eval_pack,
                "--url",
                eval_server.url,
                *FLAGS,
                "--judge-url",
                judge.url,
                "--judge-cache",
                judge_cache,
                "--out",
                out,
                "--concurrency",
                "3",
            ],
            capsys,
        )
        assert judge.calls == 0
    assert code == 0
    tasks = report["tasks"]
    assert len(tasks) == 6
    for name, result in tasks.items():
        assert result["mode"] == "openai-api" and result["url"] == eval_server.url, name
        local = local_run["first"]["report"]["tasks"][name]
        assert result["rows"] == local["rows"], name
        assert result["failed"]["count"] == local["failed"]["count"], name
    assert tasks["relative-score"]["relative_score"] == pytest.approx(75.0)
    local_rows = local_run["out"].with_suffix(".predictions.jsonl").read_text().splitlines()
    server_rows = out.with_suffix(".predictions.jsonl").read_text().splitlines()
    answers = lambda rows: [(r["id"], r["answers"]) for r in map(json.loads, rows)]  # noqa: E731
    assert answers(server_rows) == answers(local_rows)


def test_relative_score_needs_a_judge(tiny_model_dir, eval_pack, tmp_path, capsys) -> None:
    argv = [
        "eval",
        "--task",
        "relative-score",
        "--data",
        eval_pack,
        "--model",
        tiny_model_dir,
        "--no-progress",
        "--out",
        tmp_path / "r.json",
    ]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "relative-score needs --judge-model" in err


def test_cache_only_rerun_without_judge_url(
    tiny_model_dir, eval_pack, local_run, judge_cache, tmp_path, capsys
) -> None:
    """With every review cached, a report can be remade offline (no --judge-url)."""
    argv = [
        "eval",
        "--task",
        "relative-score",
        "--data",
        eval_pack,
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        *FLAGS,
        "--limit",
        "1",
        "--judge-cache",
        judge_cache,
        "--out",
        tmp_path / "r.json",
    ]
    code, report, _ = run_cli(argv, capsys)
    assert code == 0 and report["judge"]["url"] is None
    assert report["judge"]["cache_hits"] == 1 and report["relative_score"] == pytest.approx(75.0)
    empty = tmp_path / "empty-cache"
    argv = [*argv[:-4], "--judge-cache", empty, "--out", tmp_path / "s.json"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "not in the judge cache" in err


def test_asr_through_transcriptions_beside_chat(eval_server, eval_pack, tmp_path, capsys) -> None:
    """--compare-transcriptions: every asr clip also through /v1/audio/transcriptions, its WER
    reported beside the chat completions' over the same rows."""
    out = tmp_path / "asr.json"
    argv = ["eval", "--task", "asr", "--data", eval_pack, "--url", eval_server.url]
    code, report, _ = run_cli(
        [*argv, "--max-tokens", "4", "--no-progress", "--compare-transcriptions", "--out", out],
        capsys,
    )
    assert code == 0 and report["rows"] == PACK_N and report["failed"]["count"] == 0
    other = report["transcriptions"]
    assert other["wer"] >= 0 and other["reference_words"] == report["reference_words"] > 0
    assert report["wer_transcriptions_minus_chat"] == pytest.approx(other["wer"] - report["wer"])
    rows = [json.loads(r) for r in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert all(set(r["answers"]) == {"answer", "transcriptions"} for r in rows)
    assert all(isinstance(r["answers"]["transcriptions"], str) for r in rows)
    # the clips joined into one recording (with pauses), transcribed at once in segments
    long = report["long_clip"]
    assert long["clips"] == PACK_N and long["segments"] == PACK_N, long
    assert long["srt"].count(" --> ") == long["srt"].count("\n\n") <= PACK_N
    assert long["wer"] >= 0 and long["seconds"] > PACK_N * 2.5

    code, _, err = run_cli(
        [
            "eval",
            "--task",
            "asr",
            "--data",
            eval_pack,
            "--model",
            eval_pack,
            "--compare-transcriptions",
        ],
        capsys,
    )
    assert code == 2 and "--compare-transcriptions needs a server" in err
