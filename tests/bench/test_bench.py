"""`xllm bench` against a real server on the tiny model, its baseline, and its building blocks.

Timing is never asserted beyond "measured and positive": other heavy tests share this machine.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from xllm.clients.bench.load import run_load
from xllm.clients.bench.media import MediaItem, make_png, make_wav
from xllm.clients.bench.report import percentile
from xllm.clients.bench.workload import DEFAULT_MIX, build_requests, kind_counts, parse_mix

DISTRIBUTION = {"mean", "p50", "p95", "p99"}
REPORT_FIELDS = {
    "requests",
    "completed",
    "errors",
    "error_messages",
    "duration_s",
    "total_prompt_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "ttft_ms",
    "itl_ms",
    "tpot_ms",
    "e2e_ms",
    "by_kind",
    "per_request",
}


class Done:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_bench(capsys: pytest.CaptureFixture[str]):
    """`xllm bench ARGS` in this process (the interpreter has torch loaded already)."""
    from xllm.main import main

    def run(*args: str) -> Done:
        capsys.readouterr()
        code = main(["bench", "--no-progress", *args])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


def check_run(section: dict, requests: int, max_tokens: int) -> None:
    assert set(section) >= REPORT_FIELDS, REPORT_FIELDS - set(section)
    assert section["errors"] == 0, section["error_messages"]
    assert section["requests"] == section["completed"] == requests
    assert section["total_output_tokens"] == requests * max_tokens
    for record in section["per_request"]:
        assert record["completion_tokens"] == max_tokens  # ignore_eos: exactly max_tokens
        assert record["error"] is None
        assert record["prompt_tokens"] > 0
        assert 0 < record["ttft_ms"] <= record["e2e_ms"]
        assert 1 <= record["events"] <= max_tokens
    for name in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert set(section[name]) == DISTRIBUTION
        assert all(value is not None and value >= 0 for value in section[name].values()), name
        assert section[name]["p50"] <= section[name]["p95"] <= section[name]["p99"]
    assert section["output_throughput"] > 0 and section["request_throughput"] > 0
    assert section["duration_s"] > 0


def test_bench_streams_every_kind_and_reports(bench_server: str, tmp_path: Path, run_bench) -> None:
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--concurrency",
        "3",
        "--requests",
        "8",
        "--max-tokens",
        "5",
        "--mix",
        "image=1,audio=1,video=1,text=1",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_run(report["server"], 8, 5)
    assert report["config"]["concurrency"] == 3
    assert report["config"]["kinds"] == {"image": 2, "audio": 2, "video": 2, "text": 2}
    assert set(report["server"]["by_kind"]) == {"image", "audio", "video", "text"}
    assert report["baseline"] is None and report["ratios"] is None
    for line in ("== server ==", "ttft", "itl", "tpot", "e2e", "output tokens/s"):
        assert line in done.stdout


def test_bench_poisson_arrivals_with_media_dir(
    bench_server: str, tmp_path: Path, run_bench
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(make_png(1))
    (media / "b.wav").write_bytes(make_wav(2, seconds=0.5))
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--request-rate",
        "20",
        "--requests",
        "6",
        "--max-tokens",
        "3",
        "--mix",
        "image=1,audio=1",
        "--media-dir",
        str(media),
        "--warmup",
        "0",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_run(report["server"], 6, 3)
    assert report["config"]["request_rate"] == 20 and report["config"]["concurrency"] is None
    sent = [r["sent_ms"] for r in report["server"]["per_request"]]
    assert sent == sorted(sent) and sent[-1] > 0  # arrivals spread out, in order


def test_bench_counts_errors(bench_server: str, tmp_path: Path, run_bench) -> None:
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--requests",
        "2",
        "--warmup",
        "0",
        "--max-tokens",
        "100000",  # more than the context: every request is refused with a 400
        "--mix",
        "text=1",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    server = json.loads(out.read_text())["server"]
    assert server["errors"] == 2 and server["completed"] == 0
    assert sum(server["error_messages"].values()) == 2
    assert all(message.startswith("HTTP 400") for message in server["error_messages"])


def test_bench_baseline_same_requests(
    bench_server: str, tiny_model_dir: Path, tmp_path: Path, run_bench
) -> None:
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--concurrency",
        "2",
        "--requests",
        "3",
        "--max-tokens",
        "4",
        "--mix",
        "image=1,audio=1,text=1",
        "--baseline",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_run(report["server"], 3, 4)
    check_run(report["baseline"], 3, 4)
    # The same requests: same kinds in the same order, and the same prompts (same lengths).
    server_rows, base_rows = report["server"]["per_request"], report["baseline"]["per_request"]
    assert [r["kind"] for r in server_rows] == [r["kind"] for r in base_rows]
    assert [r["prompt_tokens"] for r in server_rows] == [r["prompt_tokens"] for r in base_rows]
    assert report["baseline_config"]["requests"] == 3
    ratios = report["ratios"]
    assert set(ratios) == {"output_throughput", "request_throughput", "ttft_p50"}
    assert all(value is not None and value > 0 for value in ratios.values())
    assert "server / baseline" in done.stdout


def test_bench_refuses_bad_arguments() -> None:
    """Through the installed entry point: argument errors answer at once, exit code 2."""
    for args, message in (
        (["--mix", "smell=1"], "unknown kind 'smell'"),
        (["--requests", "0"], "--requests"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "xllm", "bench", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and message in done.stderr


# --- building blocks, in process ---
def test_parse_mix_and_counts() -> None:
    assert parse_mix("image=3,text=1") == {"image": 0.75, "text": 0.25}
    assert parse_mix("audio") == {"audio": 1.0}
    for bad in ("image=-1", "image=x", "", "text=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    counts = kind_counts(parse_mix("image=1,audio=1,video=1"), 10)
    assert sum(counts.values()) == 10 and max(counts.values()) - min(counts.values()) <= 1


def decoded(item: MediaItem) -> np.ndarray:
    """What a media item holds, as the server decodes it: pixels or frames in [0, 1], samples."""
    data = io.BytesIO(item.data)
    if item.kind == "image":
        return np.asarray(Image.open(data).convert("RGB"), np.float32) / 255
    if item.kind == "audio":
        return sf.read(data, dtype="float32")[0]
    with av.open(data) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames).astype(np.float32) / 255


def test_requests_are_seeded_and_distinct() -> None:
    # The seed fixes the content (pixels, samples, frames), not an encoder's bytes: H.264 is
    # lossy, so two encodings of the same frames are compared within its error.
    mix = parse_mix(DEFAULT_MIX)
    first, again = build_requests(8, mix, seed=3), build_requests(8, mix, seed=3)
    assert [(r.kind, r.prompt) for r in first] == [(r.kind, r.prompt) for r in again]
    media = [m for r in first for m in r.media]
    assert len(media) == 6  # one item per media request
    for one, other in zip(media, [m for r in again for m in r.media], strict=True):
        a, b = decoded(one), decoded(other)
        assert one.kind == other.kind and a.shape == b.shape
        if one.kind == "video":
            assert np.abs(a - b).mean() < 0.01
        else:
            assert np.array_equal(a, b)  # PNG and PCM WAV are lossless
    for i, one in enumerate(media):  # distinct content, not only distinct bytes
        for other in media[i + 1 :]:
            a, b = decoded(one), decoded(other)
            assert a.shape != b.shape or np.abs(a - b).mean() > 0.01


def test_percentiles_match_numpy() -> None:
    import numpy as np

    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.15]
    for q in (50, 95, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_load_generator_survives_an_unreachable_server() -> None:
    requests = build_requests(2, {"text": 1.0}, seed=0)
    results, _ = asyncio.run(
        run_load(
            requests,
            url="http://127.0.0.1:9",
            max_tokens=2,
            concurrency=2,
            request_rate=None,
            seed=0,
            timeout=5,
            progress=False,
        )
    )
    assert [r.ok for r in results] == [False, False]
    assert all("connect" in (r.error or "").lower() for r in results), results


def test_bench_sends_n_and_structured_output_requests(
    bench_server: str, tmp_path: Path, run_bench
) -> None:
    """--n and --response-format go through /v1/chat/completions (media as content parts);
    a schema that cannot finish in max_tokens keeps every choice at exactly max_tokens."""
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "items": {"type": "string"}, "minItems": 99}))
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--max-tokens",
        "6",
        "--mix",
        "image=1,audio=1,video=1,text=1",
        "--n",
        "2",
        "--temperature",
        "1",
        "--response-format",
        str(schema),
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    server = report["server"]
    assert server["errors"] == 0, server["error_messages"]
    assert all(r["completion_tokens"] == 2 * 6 for r in server["per_request"])  # both choices
    assert report["config"]["openai"]["n"] == 2
    assert report["config"]["openai"]["response_format"]["type"] == "json_schema"
    bad = run_bench("--url", bench_server, "--response-format", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and "--response-format" in bad.stderr


def test_bench_reports_the_server_stages_of_the_run(
    bench_server: str, tmp_path: Path, run_bench
) -> None:
    """The stage histograms moved by the measured requests only (not the warm-up), per stage
    and modality, with p50 <= p95."""
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--concurrency",
        "2",
        "--requests",
        "3",
        "--max-tokens",
        "3",
        "--mix",
        "image=1",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["server"]["stages"]
    counts = {(row["stage"], row["modality"]): row["count"] for row in rows}
    assert counts == {
        ("media decode", "image"): 3,
        ("preprocess", "image"): 3,
        ("media ready", "image"): 3,
        ("queue", None): 3,
        ("encode", "image"): 3,
        ("prefill", None): 3,
        ("first token", None): 3,
        ("decode", None): 3,
    }
    assert all(0 <= row["p50_ms"] <= row["p95_ms"] for row in rows)
    assert "== server stages" in done.stdout
    for stage in ("media decode", "preprocess", "queue", "encode", "prefill", "first token"):
        assert f"\n{stage} " in done.stdout, stage


def test_bench_loads_an_openai_api_server(bench_server: str, tmp_path: Path, run_bench) -> None:
    """--api openai: streamed /v1/chat/completions naming the model the server lists."""
    out = tmp_path / "report.json"
    done = run_bench(
        "--url",
        bench_server,
        "--api",
        "openai",
        "--concurrency",
        "2",
        "--requests",
        "3",
        "--max-tokens",
        "4",
        "--mix",
        "text=1",
        "--extra-body",
        '{"seed": 7}',
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_run(report["server"], 3, 4)
    assert report["config"]["openai"]["seed"] == 7
    bad = run_bench("--url", bench_server, "--extra-body", "[1]")
    assert bad.returncode == 2 and "--extra-body" in bad.stderr
    listed = httpx.get(f"{bench_server}/v1/models").json()["data"][0]["id"]
    assert report["config"]["api"] == "openai"
    assert report["config"]["openai"]["model"] == listed


def test_stage_quantiles_interpolate_within_buckets() -> None:
    from xllm.clients.bench.stages import quantile, stage_summary

    assert quantile(0.5, {0.1: 0, 0.2: 10, math.inf: 10}) == pytest.approx(0.15)
    assert quantile(0.5, {0.1: 4, 0.2: 4, math.inf: 10}) == 0.2  # in +Inf: the last bound
    assert quantile(0.5, {0.1: 0, math.inf: 0}) is None
    before = (
        "# TYPE xllm_request_prefill_time_seconds histogram\n"
        'xllm_request_prefill_time_seconds_bucket{le="0.1"} 5.0\n'
        'xllm_request_prefill_time_seconds_bucket{le="0.2"} 5.0\n'
        'xllm_request_prefill_time_seconds_bucket{le="+Inf"} 5.0\n'
    )
    after = before.replace('0.2"} 5.0', '0.2"} 9.0').replace('Inf"} 5.0', 'Inf"} 9.0')
    (row,) = stage_summary(before, after)  # only what the run added: 4 requests in (0.1, 0.2]
    assert row == {
        "stage": "prefill",
        "modality": None,
        "count": 4,
        "p50_ms": pytest.approx(150.0),
        "p95_ms": pytest.approx(195.0),
    }
