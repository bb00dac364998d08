"""Where the server's time went during a run: its stage histograms (`GET /metrics`) read before
and after the measured requests, the difference summarised per stage as p50/p95. "media
ready" is a request's arrival to its media all prepared: the decode and preprocess of its items
plus any wait for a thread of the server's media pool.

Read from /metrics rather than from per-request timings in the responses: every xllm server
exports them whatever the endpoint, streaming or not, without a field or header that OpenAI's
API lacks (and a proxy might drop). The price: the quantiles are estimated within histogram
buckets (as Prometheus's histogram_quantile does: linear within the bucket that holds the
rank), and requests other clients send during the run count too.
"""

from __future__ import annotations

import math
from typing import Any

# (stage, histogram, labelled by modality), in the order a request meets them
STAGES = (
    ("fetch", "xllm_media_fetch_seconds", True),
    ("media decode", "xllm_media_decode_seconds", True),
    ("preprocess", "xllm_media_preprocess_seconds", True),
    ("media ready", "xllm_request_media_prepare_seconds", True),
    ("queue", "xllm_request_queue_time_seconds", False),
    ("encode", "xllm_request_encode_time_seconds", True),
    ("prefill", "xllm_request_prefill_time_seconds", False),
    ("first token", "xllm_time_to_first_token_seconds", False),
    ("decode", "xllm_request_decode_time_seconds", False),
)

Buckets = dict[float, float]  # upper bound -> cumulative count


def parse_histograms(text: str) -> dict[tuple[str, str], Buckets]:
    """(histogram name, modality or "") -> its cumulative bucket counts, for the STAGES."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {name for _, name, _ in STAGES}
    found: dict[tuple[str, str], Buckets] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = (family.name, sample.labels.get("modality", ""))
                found.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    return found


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile (0..1) of a histogram's cumulative buckets, Prometheus's way; None when
    it is empty. A rank in the +Inf bucket gives the highest finite bound."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def stage_summary(before: str, after: str) -> list[dict[str, Any]]:
    """Per stage (and modality) the requests that passed it during the run, and their p50/p95
    in milliseconds."""
    start, end = parse_histograms(before), parse_histograms(after)
    rows = []
    for stage, name, by_modality in STAGES:
        for (metric, modality), buckets in sorted(end.items()):
            if metric != name:
                continue
            earlier = start.get((metric, modality), {})
            delta = {bound: count - earlier.get(bound, 0.0) for bound, count in buckets.items()}
            count = delta.get(math.inf, 0.0)
            if count <= 0:
                continue
            p50, p95 = quantile(0.5, delta), quantile(0.95, delta)
            rows.append(
                {
                    "stage": stage,
                    "modality": modality if by_modality else None,
                    "count": int(count),
                    "p50_ms": None if p50 is None else round(1000 * p50, 3),
                    "p95_ms": None if p95 is None else round(1000 * p95, 3),
                }
            )
    return rows


def format_stages(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "== server stages (from /metrics; p50/p95 estimated within histogram buckets) ==",
        f"{'stage':<14}{'modality':<10}{'count':>7}{'p50 ms':>11}{'p95 ms':>11}",
    ]
    for row in rows:
        lines.append(
            f"{row['stage']:<14}{row['modality'] or '-':<10}{row['count']:>7}"
            f"{row['p50_ms']:>11.2f}{row['p95_ms']:>11.2f}"
        )
    return lines
