"""What comes back: per-request timings, and the figures of a run (p50/p95/p99, throughput).

Measured per request, from the client's side: TTFT (request sent -> first SSE event), the
inter-token latencies (gaps between SSE events), TPOT ((end - first event) / (tokens - 1)) and
end-to-end latency; output tokens come from the final event's `usage.completion_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from xllm.clients.bench.stages import format_stages
from xllm.clients.bench.workload import KINDS

PERCENTILES = (50, 95, 99)


@dataclass
class RequestResult:
    index: int
    kind: str
    ok: bool = False
    error: str | None = None
    start: float = 0.0  # perf_counter when sent
    ttft: float | None = None  # seconds to the first streamed event
    e2e: float | None = None  # seconds to the final event
    itl: list[float] = field(default_factory=list)  # gaps between streamed events
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    out = {"mean": round(1000 * sum(values) / len(values), 3)}
    for q in PERCENTILES:
        out[f"p{q}"] = round(1000 * percentile(values, q), 3)
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """The figures of one run (server or baseline); latencies in milliseconds."""
    done = [r for r in results if r.ok]
    first = min((r.start for r in results), default=0.0)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    output_tokens = sum(r.completion_tokens for r in done)
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [r for r in done if r.kind == kind]
        if mine:
            by_kind[kind] = {
                "completed": len(mine),
                "ttft_ms": distribution_ms([r.ttft for r in mine if r.ttft is not None]),
                "e2e_ms": distribution_ms([r.e2e for r in mine if r.e2e is not None]),
            }
    return {
        "requests": len(results),
        "completed": len(done),
        "errors": len(results) - len(done),
        "error_messages": errors,
        "duration_s": round(duration, 4),
        "total_prompt_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens,
        "request_throughput": round(len(done) / duration, 4) if duration > 0 else None,
        "output_throughput": round(output_tokens / duration, 3) if duration > 0 else None,
        "ttft_ms": distribution_ms([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl]),
        "tpot_ms": distribution_ms([t for r in done if (t := r.tpot) is not None]),
        "e2e_ms": distribution_ms([r.e2e for r in done if r.e2e is not None]),
        "by_kind": by_kind,
        "per_request": [_record(r, first) for r in results],
    }


def _record(r: RequestResult, first: float) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 3)

    return {
        "index": r.index,
        "kind": r.kind,
        "sent_ms": ms(r.start - first),
        "ttft_ms": ms(r.ttft),
        "e2e_ms": ms(r.e2e),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "events": len(r.itl) + (1 if r.ttft is not None else 0),
        "error": r.error,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = []
    sections = [("server", report["server"])]
    if report.get("baseline"):
        sections.append(("baseline (HF generate, 1 at a time)", report["baseline"]))
    for title, s in sections:
        lines.append(f"== {title} ==")
        lines.append(
            f"completed {s['completed']}/{s['requests']}, errors {s['errors']}, "
            f"{s['duration_s']:.2f} s"
        )
        for message, count in s["error_messages"].items():
            lines.append(f"  error x{count}: {message}")
        if s["completed"]:
            lines.append(
                f"output tokens/s {s['output_throughput']:.2f}   requests/s "
                f"{s['request_throughput']:.3f}   output tokens {s['total_output_tokens']}"
            )
            lines.append(f"{'ms':<6}{'mean':>11}{'p50':>11}{'p95':>11}{'p99':>11}")
            for name in ("ttft", "itl", "tpot", "e2e"):
                d = s[f"{name}_ms"]
                cells = "".join(
                    f"{'-' if d[k] is None else format(d[k], '.2f'):>11}"
                    for k in ("mean", "p50", "p95", "p99")
                )
                lines.append(f"{name:<6}{cells}")
        if s.get("stages"):
            lines.extend(format_stages(s["stages"]))
    ratios = report.get("ratios")
    if ratios:
        lines.append("== server / baseline ==")
        for key, value in ratios.items():
            lines.append(f"{key}: {'-' if value is None else format(value, '.2f')}")
    return "\n".join(lines)
