"""Prometheus metrics (`GET /metrics`), on a registry per app so several apps can coexist."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xllm.server.engine.contract import EngineObserver

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics(EngineObserver):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("xllm_num_requests_running", "Requests holding a KV slot", registry=r)
        self.waiting = Gauge(
            "xllm_num_requests_waiting", "Requests accepted and not yet running", registry=r
        )
        self.kv_usage = Gauge(
            "xllm_kv_cache_usage_ratio", "Used fraction of the KV-cache positions", registry=r
        )
        self.ttft = Histogram(
            "xllm_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "xllm_inter_token_latency_seconds",
            "Between streamed tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "xllm_e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "xllm_request_queue_time_seconds",
            "Arrival to admission into a slot",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.encoder = Histogram(
            "xllm_encoder_seconds",
            "Encoder + X2L interface time per batched call",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per-request media stages in the API process, before the engine sees the request.
        self.media_decode = Histogram(
            "xllm_media_decode_seconds",
            "Container/codec decoding of one media item",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.media_preprocess = Histogram(
            "xllm_media_preprocess_seconds",
            "Resizing/normalising pixels or computing log-mel features of one media item",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated = Counter("xllm_generated_tokens_total", "Tokens generated", registry=r)
        self.prefilled = Counter(
            "xllm_prefill_tokens_total",
            "Prompt positions computed by prefill forwards (n choices of a prompt: once)",
            registry=r,
        )
        self.prompt = Counter("xllm_prompt_tokens_total", "Prompt positions processed", registry=r)
        self.prefix_queries = Counter(
            "xllm_prefix_cache_queries",
            "Prompt positions looked up in the KV cache (prefix reuse)",
            registry=r,
        )
        self.prefix_hits = Counter(
            "xllm_prefix_cache_hits",
            "Prompt positions found in the KV cache, not prefilled again",
            registry=r,
        )
        self.requests = Counter(
            "xllm_requests_total", "Finished HTTP requests", ["endpoint", "status"], registry=r
        )

    def media_stages(self, modality: str, decode: float, preprocess: float) -> None:
        self.media_decode.labels(modality=modality).observe(decode)
        self.media_preprocess.labels(modality=modality).observe(preprocess)

    # EngineObserver
    def queue_time(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def encoder_time(self, modality: str, seconds: float) -> None:
        self.encoder.labels(modality=modality).observe(seconds)

    def prefill(self, positions: int) -> None:
        self.prefilled.inc(positions)

    def request_done(self, seconds: float) -> None:
        self.e2e.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self.prompt.inc(prompt)
        if generated:
            self.generated.inc(generated)

    def prefix_cache(self, queried: int, hit: int) -> None:
        self.prefix_queries.inc(queried)
        self.prefix_hits.inc(hit)

    def step(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
